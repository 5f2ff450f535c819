//! The WebSocket fallbacks of the native protocol, as the official SDKs speak them:
//!
//! - `GET /connection/sse?cf_connect=<connect command>`: Server-Sent Events, one reply per
//!   event (`data: <json>\n\n`);
//! - `POST /connection/http_stream` with the connect command as the body: a long-lived response
//!   of newline-delimited JSON replies; or, with `Content-Type: application/octet-stream`, of
//!   length-delimited Protobuf replies (SSE is JSON only, as in Centrifugo);
//! - `POST /emulation` `{"session","node","data"}` (or the same as a Protobuf
//!   `EmulationRequest`, with `Content-Type: application/octet-stream`): the client's commands
//!   (and pongs) for a stream, routed to that stream's task by its session id.
//!
//! A stream is driven by [`stream::run`], one task per stream, with the same rules as a native
//! WebSocket (pings, pong timeout, stale, slow, shutdown, expiry); since a stream has no close
//! code, every disconnect is a `disconnect` push sent as the last reply before the stream ends.

mod stream;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use http::header::{CACHE_CONTROL, CONTENT_TYPE};
use http::{HeaderMap, HeaderValue, StatusCode};
use plexus_core::NodeCommand;
use plexus_protocol::client::protobuf::EmulationRequest as ProtobufEmulationRequest;
use plexus_protocol::client::Format;
use serde::Deserialize;
use tokio::sync::mpsc;

use crate::metrics::Refusal;
use crate::native::session::{ClientSession, StreamIds};
use crate::Shared;

/// Commands waiting for a stream's task, per stream.
const COMMAND_QUEUE: usize = 16;
/// Body chunks waiting for hyper, per stream (each reply is one to three chunks).
const BODY_QUEUE: usize = 64;

/// The live streams of this node, by session id, and the node's id.
pub(crate) struct Sessions {
    node: Arc<str>,
    streams: Mutex<HashMap<Arc<str>, mpsc::Sender<Bytes>>>,
}

impl Sessions {
    /// `node`: this node's id, which the SDK sends back with each `/emulation` request.
    pub(crate) fn new(node: Arc<str>) -> Sessions {
        Sessions {
            node,
            streams: Mutex::new(HashMap::new()),
        }
    }

    /// This node's id.
    pub(crate) fn node(&self) -> &Arc<str> {
        &self.node
    }

    fn insert(&self, session: Arc<str>, commands: mpsc::Sender<Bytes>) {
        self.lock().insert(session, commands);
    }

    fn remove(&self, session: &str) {
        self.lock().remove(session);
    }

    fn get(&self, session: &str) -> Option<mpsc::Sender<Bytes>> {
        self.lock().get(session).cloned()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, mpsc::Sender<Bytes>>> {
        self.streams
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// How a stream writes its replies.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Kind {
    Sse,
    HttpStream,
}

impl Kind {
    fn content_type(self, format: Format) -> &'static str {
        match (self, format) {
            (Kind::Sse, _) => "text/event-stream",
            (Kind::HttpStream, Format::Json) => "application/json",
            (Kind::HttpStream, Format::Protobuf) => BINARY,
        }
    }
}

/// The content type of Protobuf requests and streams.
const BINARY: &str = "application/octet-stream";

/// Whether a request's body is Protobuf (`Content-Type: application/octet-stream`).
fn is_binary(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.trim().starts_with(BINARY))
}

/// `GET /connection/sse?cf_connect=...`.
pub(crate) async fn sse(
    State(shared): State<Arc<Shared>>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let connect = query.get("cf_connect").cloned().unwrap_or_default();
    start(
        shared,
        &headers,
        Bytes::from(connect),
        Kind::Sse,
        Format::Json,
    )
}

/// `POST /connection/http_stream` with the connect command as the body.
pub(crate) async fn http_stream(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let format = if is_binary(&headers) {
        Format::Protobuf
    } else {
        Format::Json
    };
    start(shared, &headers, body, Kind::HttpStream, format)
}

fn bad_origin(shared: &Shared, headers: &HeaderMap) -> Option<Response> {
    let origin = crate::ws::check_origin(&shared.config.allowed_origins, headers).err()?;
    shared.metrics.refused(Refusal::BadOrigin);
    Some(
        (
            StatusCode::FORBIDDEN,
            format!("origin {origin} is not allowed\n"),
        )
            .into_response(),
    )
}

fn start(
    shared: Arc<Shared>,
    headers: &HeaderMap,
    connect: Bytes,
    kind: Kind,
    format: Format,
) -> Response {
    if let Some(refused) = bad_origin(&shared, headers) {
        return refused;
    }
    if connect.is_empty() {
        let what = match kind {
            Kind::Sse => "the cf_connect parameter",
            Kind::HttpStream => "a body",
        };
        return (
            StatusCode::BAD_REQUEST,
            format!("expected the connect command as {what}\n"),
        )
            .into_response();
    }
    if connect.len() > shared.config.max_message_size {
        return (StatusCode::PAYLOAD_TOO_LARGE, "connect command too large\n").into_response();
    }
    let session_id = crate::new_client_id();
    let ids = StreamIds {
        session: session_id.to_string(),
        node: shared.emulation.node.to_string(),
        transport: match kind {
            Kind::Sse => "sse",
            Kind::HttpStream => "http_stream",
        },
    };
    let forwarded = if shared.proxies.any() {
        crate::proxy::forwarded(&shared.config.proxy_http_headers, headers)
    } else {
        Vec::new()
    };
    let session = ClientSession::new_stream(&shared, ids, format, forwarded);
    let (commands_tx, commands) = mpsc::channel(COMMAND_QUEUE);
    let (body_tx, body) = mpsc::channel(BODY_QUEUE);
    shared.emulation.insert(session_id.clone(), commands_tx);
    let task_shared = shared.clone();
    shared.tasks.spawn(stream::run(
        task_shared,
        kind,
        session_id,
        session,
        connect,
        commands,
        body_tx,
    ));
    let mut response = Response::new(Body::new(stream::ReplyBody::new(body)));
    let response_headers = response.headers_mut();
    response_headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static(kind.content_type(format)),
    );
    response_headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // Asks reverse proxies (nginx) not to buffer the stream.
    response_headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

/// A `POST /emulation` request, from JSON or Protobuf.
struct EmulationRequest {
    session: String,
    node: String,
    /// The command frame, as the client would send it over a WebSocket.
    data: Bytes,
}

/// The JSON body of `POST /emulation`.
#[derive(Deserialize)]
struct JsonEmulationRequest {
    session: String,
    /// The node that owns the stream (from the connect reply).
    #[serde(default)]
    node: String,
    /// The command frame, as the client would send it over a WebSocket.
    data: String,
}

/// `POST /emulation`: one frame of commands (or a pong) for a stream. 200 with an empty body
/// once the stream's task has it, or, for a stream of another node (`node` names it, and the
/// engine links nodes), once the frame is sent to that node as a [`NodeCommand::Emulation`];
/// 404 for a session this node does not have and cannot pass on (the SDK closes and
/// reconnects); 400 for a body that is not an emulation request.
pub(crate) async fn emulation(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(refused) = bad_origin(&shared, &headers) {
        return refused;
    }
    if body.len() > shared.config.max_message_size.saturating_add(1024) {
        return (StatusCode::PAYLOAD_TOO_LARGE, "request too large\n").into_response();
    }
    let request = if is_binary(&headers) {
        ProtobufEmulationRequest::decode(&body)
            .map(|request| EmulationRequest {
                session: request.session,
                node: request.node,
                data: request.data,
            })
            .map_err(|error| error.to_string())
    } else {
        serde_json::from_slice::<JsonEmulationRequest>(&body)
            .map(|request| EmulationRequest {
                session: request.session,
                node: request.node,
                data: Bytes::from(request.data),
            })
            .map_err(|error| error.to_string())
    };
    let request = match request {
        Ok(request) => request,
        Err(error) => {
            return (
                StatusCode::BAD_REQUEST,
                format!("bad emulation request: {error}\n"),
            )
                .into_response()
        }
    };
    let Some(commands) = shared.emulation.get(&request.session) else {
        if request.node.is_empty() || *request.node == *shared.emulation.node || !has_peers(&shared)
        {
            return (StatusCode::NOT_FOUND, "unknown session\n").into_response();
        }
        let command = NodeCommand::Emulation {
            node: request.node.into(),
            session: request.session.into(),
            data: request.data,
        };
        return match shared.node.command(command).await {
            Ok(()) => StatusCode::OK.into_response(),
            Err(error) => {
                tracing::warn!(%error, "cannot pass an emulation request to its node");
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "cannot reach the session's node\n",
                )
                    .into_response()
            }
        };
    };
    match commands.send(request.data).await {
        Ok(()) => StatusCode::OK.into_response(),
        Err(_) => (StatusCode::NOT_FOUND, "unknown session\n").into_response(),
    }
}

/// Whether the engine links this node to others (a broker): only then can a session live on
/// another node.
fn has_peers(shared: &Shared) -> bool {
    matches!(shared.node.engine().name(), "redis" | "nats")
}

/// Hands the [`NodeCommand::Emulation`]s for this node's sessions, sent through other nodes'
/// `/emulation`, to their streams, as a local request would; one task keeps their order.
/// Returns where to send them (see [`crate::peers::listen`]).
pub(crate) fn serve_remote_frames(
    shared: &Arc<Shared>,
) -> mpsc::UnboundedSender<(Arc<str>, Bytes)> {
    let (frames_tx, mut frames) = mpsc::unbounded_channel::<(Arc<str>, Bytes)>();
    let weak = Arc::downgrade(shared);
    let shutdown = shared.shutdown.clone();
    shared.tasks.spawn(async move {
        loop {
            let (session, data) = tokio::select! {
                () = shutdown.cancelled() => return,
                frame = frames.recv() => match frame {
                    Some(frame) => frame,
                    None => return,
                },
            };
            let Some(commands) = weak
                .upgrade()
                .and_then(|shared| shared.emulation.get(&session))
            else {
                continue;
            };
            // A stream that has ended drops its receiver: nothing to do.
            let _ = commands.send(data).await;
        }
    });
    frames_tx
}
