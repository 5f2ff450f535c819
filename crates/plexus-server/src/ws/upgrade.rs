use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::response::{IntoResponse, Response};
use http::header::{
    CONNECTION, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_EXTENSIONS, SEC_WEBSOCKET_KEY,
    SEC_WEBSOCKET_PROTOCOL, SEC_WEBSOCKET_VERSION, UPGRADE,
};
use http::{HeaderValue, Method, StatusCode};
use hyper_util::rt::TokioIo;
use plexus_protocol::channel::room_channel;
use plexus_protocol::client::{Format, PROTOBUF_SUBPROTOCOL};
use plexus_protocol::ws::handshake::{
    accepts_deflate, UpgradeError, UpgradeRequest, DEFLATE_RESPONSE,
};

use bytes::Bytes;
use plexus_core::{BoxFuture, DirectWriter};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use super::connection::{self, Handler};
use super::direct::{Frames, SharedTcp, SocketWriter};
use super::raw::RawRoom;
use crate::metrics::Refusal;
use crate::tracked::Tracked;
use crate::Shared;

/// `GET /echo`: every message comes back unchanged.
pub(crate) async fn echo(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    upgrade(shared, request, Endpoint::Echo)
}

/// `GET /connection/websocket`: the native (Centrifugo-compatible) protocol, in JSON or, asked
/// for with the subprotocol `centrifuge-protobuf` or `?cf_protocol=protobuf`, in Protobuf.
pub(crate) async fn native(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    let subprotocols = request
        .headers()
        .get_all(SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|value| value.to_str().ok());
    let (format, subprotocol) = Format::requested(subprotocols, request.uri().query());
    let headers = if shared.proxies.any() {
        crate::proxy::forwarded(&shared.config.proxy_http_headers, request.headers())
    } else {
        Vec::new()
    };
    let mut response = upgrade(shared, request, Endpoint::Native(format, headers));
    if subprotocol && response.status() == StatusCode::SWITCHING_PROTOCOLS {
        response.headers_mut().insert(
            SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(PROTOBUF_SUBPROTOCOL),
        );
    }
    response
}

/// `GET /chat/{room}`: every message goes to everyone in channel `chat:{room}`, sender included.
pub(crate) async fn chat(
    State(shared): State<Arc<Shared>>,
    Path(room): Path<String>,
    request: Request,
) -> Response {
    match room_channel(&room) {
        Ok(channel) => upgrade(shared, request, Endpoint::Room(channel)),
        Err(error) => {
            shared.metrics.refused(Refusal::BadUpgrade);
            (StatusCode::BAD_REQUEST, format!("bad room name: {error}\n")).into_response()
        }
    }
}

fn refuse(error: UpgradeError) -> Response {
    let status = StatusCode::from_u16(error.status()).unwrap_or(StatusCode::BAD_REQUEST);
    let mut response = (status, format!("{error}\n")).into_response();
    if status == StatusCode::UPGRADE_REQUIRED {
        let headers = response.headers_mut();
        headers.insert(SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"));
        headers.insert(UPGRADE, HeaderValue::from_static("websocket"));
    }
    response
}

/// What an upgraded connection will speak.
enum Endpoint {
    Echo,
    /// The native protocol, in this format, with these request headers for the backends.
    Native(Format, crate::proxy::ForwardedHeaders),
    /// A raw room in this channel.
    Room(String),
}

fn upgrade(shared: Arc<Shared>, mut request: Request, endpoint: Endpoint) -> Response {
    let headers = request.headers();
    let text = |name| {
        headers
            .get(name)
            .and_then(|value: &HeaderValue| value.to_str().ok())
    };
    let handshake = UpgradeRequest {
        method_is_get: request.method() == Method::GET,
        upgrade: text(UPGRADE),
        connection: text(CONNECTION),
        version: text(SEC_WEBSOCKET_VERSION),
        key: text(SEC_WEBSOCKET_KEY),
    };
    let accept = match handshake.accept() {
        Ok(accept) => accept,
        Err(error) => {
            shared.metrics.refused(Refusal::BadUpgrade);
            return refuse(error);
        }
    };
    if let Err(origin) = check_origin(&shared.config.allowed_origins, headers) {
        shared.metrics.refused(Refusal::BadOrigin);
        return (
            StatusCode::FORBIDDEN,
            format!("origin {origin} is not allowed\n"),
        )
            .into_response();
    }
    let deflate = shared.config.websocket_compression
        && headers
            .get_all(SEC_WEBSOCKET_EXTENSIONS)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .any(accepts_deflate);
    let on_upgrade = hyper::upgrade::on(&mut request);
    let task_shared = shared.clone();
    shared
        .tasks
        .spawn(serve_upgraded(on_upgrade, task_shared, endpoint, deflate));
    let mut response = Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(CONNECTION, "upgrade")
        .header(UPGRADE, "websocket")
        .header(SEC_WEBSOCKET_ACCEPT, accept);
    if deflate {
        response = response.header(SEC_WEBSOCKET_EXTENSIONS, DEFLATE_RESPONSE);
    }
    response
        .body(Body::empty())
        .expect("static headers are valid")
}

/// The task of one upgraded WebSocket: waits for hyper to hand over the socket, then runs it.
/// What it holds while the connection lives is what every idle connection costs, so the
/// setup and the connection's own state are on the heap and the task keeps two pointers.
async fn serve_upgraded(
    on_upgrade: hyper::upgrade::OnUpgrade,
    shared: Arc<Shared>,
    endpoint: Endpoint,
    deflate: bool,
) {
    let prepare = match on_upgrade.await {
        Ok(upgraded) => Box::pin(unwrap_upgraded(upgraded, shared, endpoint, deflate)),
        Err(error) => {
            tracing::debug!(%error, "WebSocket upgrade did not complete");
            return;
        }
    };
    if let Some(connection) = prepare.await {
        connection.await
    }
}

/// Over plain TCP the socket comes back out of hyper, to be shared with a direct writer (see
/// `direct`); over TLS it stays in hyper's upgraded stream, written by the task only.
async fn unwrap_upgraded(
    upgraded: hyper::upgrade::Upgraded,
    shared: Arc<Shared>,
    endpoint: Endpoint,
    deflate: bool,
) -> Option<BoxFuture<()>> {
    match upgraded.downcast::<TokioIo<Tracked<TcpStream>>>() {
        Ok(parts) => {
            let mut socket = None;
            let io = parts.io.into_inner().map_io(|stream| {
                let stream = Arc::new(stream);
                socket = Some(stream.clone());
                SharedTcp(stream)
            });
            start(shared, io, parts.read_buf, socket, endpoint, deflate).await
        }
        Err(upgraded) => {
            let io = TokioIo::new(upgraded);
            start(shared, io, Bytes::new(), None, endpoint, deflate).await
        }
    }
}

/// Prepares an upgraded connection (joins its room, if it has one) and returns the future that
/// runs it, or None if it was refused and closed. `read` holds bytes the client sent right after
/// its handshake; `socket`, when given, is the same socket as `io`, for direct writes.
///
/// Separate from running it, so the connection's long-lived task holds the running state only.
async fn start<IO>(
    shared: Arc<Shared>,
    io: IO,
    read: Bytes,
    socket: Option<Arc<TcpStream>>,
    endpoint: Endpoint,
    deflate: bool,
) -> Option<BoxFuture<()>>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let writer = |frames| {
        socket.map(|socket| {
            SocketWriter::new(&shared, socket, frames, deflate) as Arc<dyn DirectWriter>
        })
    };
    let handler = match endpoint {
        Endpoint::Echo => {
            let outbox = Arc::new(plexus_core::Outbox::new(shared.config.outbox_limit));
            if let Some(writer) = writer(Frames::Raw) {
                outbox.set_writer(writer);
            }
            Handler::Echo(outbox)
        }
        Endpoint::Native(format, headers) => {
            let session = crate::native::session::ClientSession::new(&shared, format, headers);
            if let Some(writer) = writer(Frames::Native(format)) {
                session.outbox().set_writer(writer);
            }
            Handler::Native(session)
        }
        Endpoint::Room(channel) => {
            match RawRoom::join(&shared, &channel, writer(Frames::Raw)).await {
                Ok(room) => Handler::Room(room),
                Err((code, reason)) => {
                    tracing::debug!(%channel, %reason, "raw room subscribe refused");
                    shared.metrics.websocket_closed(code);
                    let mut wire = crate::wire::Wire::new(io);
                    wire.queue(plexus_protocol::ws::encode_close(code, &reason));
                    wire.finish(std::time::Duration::from_secs(1)).await;
                    return None;
                }
            }
        }
    };
    // Boxed: passed back through the caller's `await`, an unboxed future would be held in the
    // task's state more than once over, which every idle connection would pay for.
    Some(Box::pin(connection::run(
        io, read, shared, handler, deflate,
    )))
}

/// The size of a WebSocket connection's task future (for the size probe in `connection`).
#[cfg(test)]
pub(super) fn task_future_size() -> usize {
    fn size<A, B, C, D, F, Fut>(_: F) -> usize
    where
        F: FnOnce(A, B, C, D) -> Fut,
    {
        std::mem::size_of::<Fut>()
    }
    size(serve_upgraded)
}

/// Cross-site WebSocket hijacking guard: a browser's `Origin` must be this server itself, or be
/// listed in `allowed_origins` (`*` allows any). Requests without `Origin` come from
/// non-browser clients and are allowed.
pub(crate) fn check_origin(allowed: &[String], headers: &http::HeaderMap) -> Result<(), String> {
    let Some(origin) = headers.get(http::header::ORIGIN) else {
        return Ok(());
    };
    let origin = origin.to_str().unwrap_or("").trim();
    if allowed
        .iter()
        .any(|allowed| allowed == "*" || allowed.eq_ignore_ascii_case(origin))
    {
        return Ok(());
    }
    let host = headers
        .get(http::header::HOST)
        .and_then(|host| host.to_str().ok())
        .unwrap_or("");
    let origin_host = origin
        .strip_prefix("https://")
        .or_else(|| origin.strip_prefix("http://"))
        .unwrap_or("");
    if !host.is_empty() && origin_host.eq_ignore_ascii_case(host) {
        return Ok(());
    }
    Err(origin.to_owned())
}

#[cfg(test)]
mod tests {
    use super::check_origin;

    #[test]
    fn origins() {
        let headers = |origin: Option<&str>| {
            let mut headers = http::HeaderMap::new();
            headers.insert(http::header::HOST, "chat.example:8000".parse().unwrap());
            if let Some(origin) = origin {
                headers.insert(http::header::ORIGIN, origin.parse().unwrap());
            }
            headers
        };
        assert!(check_origin(&[], &headers(None)).is_ok());
        assert!(check_origin(&[], &headers(Some("http://chat.example:8000"))).is_ok());
        assert!(check_origin(&[], &headers(Some("https://evil.example"))).is_err());
        let listed = vec!["https://app.example".to_owned()];
        assert!(check_origin(&listed, &headers(Some("https://app.example"))).is_ok());
        assert!(check_origin(&["*".into()], &headers(Some("https://any.example"))).is_ok());
    }
}
