//! The RPC proxy: a protocol client's `rpc` command is POSTed to the application's backend at
//! `rpc_proxy_url`, as Centrifugo's RPC proxy does, and the backend's answer goes back to the
//! client. The server stays the only thing clients talk to; the backend stays private.
//!
//! Request body (JSON): `client`, `transport` (`websocket`, `sse`, `http_stream`), `protocol`
//! (`json` or `protobuf`, what the client speaks), `user`, `method`, and the client's data: as
//! `data` when it is JSON (`encoding` is `json`), else as `b64data`, its base64 (`encoding` is
//! `binary`; only a Protobuf client can send that).
//! Answer: `{"result":{"data":...}}` or `{"result":{"b64data":"..."}}` (the client gets the
//! data; a JSON client gets binary data as a base64 string), `{"error":{"code":N,
//! "message":"..."}}` (the client gets that error), or `{"disconnect":{"code":N,"reason":"..."}}`
//! (the client is disconnected with it; the code must be from 3000 to 4999, the reason at most
//! 123 bytes). A backend that does not answer within
//! `rpc_proxy_timeout`, answers with another HTTP status, or with something else, gives the
//! client error 100 (internal) and a warning in the log.

use std::time::Duration;

use crate::outbound::{http_client, HttpClient};
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderValue, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use plexus_protocol::client::{Error as ProtocolError, Payload, RawJson};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// The most a backend's answer may hold.
const MAX_ANSWER: usize = 1 << 20;

/// What the client is told.
#[derive(Debug)]
pub(crate) enum Answer {
    Result(Option<Payload>),
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

/// One `rpc` call.
#[derive(Debug)]
pub(crate) struct RpcCall<'a> {
    pub client: &'a str,
    pub transport: &'a str,
    pub protocol: &'static str,
    pub user: &'a str,
    pub method: &'a str,
    pub data: Option<&'a Payload>,
}

/// An `rpc` call as the backend gets it.
#[derive(Debug, Serialize)]
struct CallBody<'a> {
    client: &'a str,
    transport: &'a str,
    protocol: &'static str,
    encoding: &'static str,
    user: &'a str,
    method: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    b64data: Option<String>,
}

impl<'a> RpcCall<'a> {
    fn body(&self) -> CallBody<'a> {
        let json = self.data.map(|data| data.as_json());
        CallBody {
            client: self.client,
            transport: self.transport,
            protocol: self.protocol,
            encoding: if matches!(json, Some(None)) {
                "binary"
            } else {
                "json"
            },
            user: self.user,
            method: self.method,
            data: json.flatten(),
            b64data: match (self.data, json) {
                (Some(data), Some(None)) => Some(BASE64.encode(data.as_bytes())),
                _ => None,
            },
        }
    }
}

#[derive(Debug, Deserialize)]
struct Reply {
    result: Option<ResultBody>,
    error: Option<ProtocolError>,
    disconnect: Option<DisconnectBody>,
}

#[derive(Debug, Default, Deserialize)]
struct ResultBody {
    data: Option<RawJson>,
    b64data: Option<String>,
}

impl ResultBody {
    fn payload(self) -> Result<Option<Payload>, ProxyError> {
        match (self.data, self.b64data) {
            (_, Some(b64)) => BASE64
                .decode(b64)
                .map(|bytes| Some(Payload::new(bytes)))
                .map_err(|error| ProxyError::BadAnswer(format!("b64data: {error}"))),
            (data, None) => Ok(data.map(Payload::from)),
        }
    }
}

#[derive(Debug, Deserialize)]
struct DisconnectBody {
    code: u16,
    #[serde(default)]
    reason: String,
}

/// The backend, with a pool of kept-alive connections.
pub(crate) struct RpcProxy {
    client: HttpClient,
    url: Uri,
    timeout: Duration,
}

impl RpcProxy {
    /// `url` is an `http://` or `https://` URL (checked by the configuration).
    pub(crate) fn new(url: &str, timeout: Duration) -> Result<RpcProxy, http::uri::InvalidUri> {
        let url: Uri = url.parse()?;
        let client = http_client(timeout);
        Ok(RpcProxy {
            client,
            url,
            timeout,
        })
    }

    pub(crate) async fn call(&self, call: &RpcCall<'_>) -> Result<Answer, ProxyError> {
        let body = serde_json::to_vec(&call.body()).expect("a call is JSON");
        let mut request = Request::post(self.url.clone())
            .body(Full::new(Bytes::from(body)))
            .expect("a POST to a parsed URI is a request");
        request
            .headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
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
        let reply: Reply = serde_json::from_slice(&body)
            .map_err(|error| ProxyError::BadAnswer(error.to_string()))?;
        match reply {
            // Only the application range of close codes: others mean something to WebSocket
            // itself, or are Plexus's own.
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
            } => Ok(Answer::Result(result.payload()?)),
            _ => Err(ProxyError::BadAnswer(
                "neither result, error nor disconnect".into(),
            )),
        }
    }
}
