//! The HTTP side of the main listener: TLS, hyper connections, routes.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use http::header::CONTENT_TYPE;
use http::{HeaderValue, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tower::Service;

use crate::limits::ConnectionGuard;
use crate::metrics::Refusal;
use crate::tracked::Tracked;
use crate::{ws, Shared};

const INDEX_HTML: &str = include_str!("../static/index.html");
const QUOTES_HTML: &str = include_str!("../static/quotes.html");
const ADMIN_HTML: &str = include_str!("../static/admin.html");
const PLEXUS_CSS: &str = include_str!("../static/plexus.css");
const CHARTS_JS: &str = include_str!("../static/charts.js");
const PLEXUS_JS: &str = include_str!("../static/plexus.js");
const PLEXUS_D_TS: &str = include_str!("../static/plexus.d.ts");

pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/quotes", get(quotes))
        .route("/admin", get(admin))
        .route("/plexus.css", get(plexus_css))
        .route("/charts.js", get(charts_js))
        .route("/plexus.js", get(plexus_js))
        .route("/plexus.d.ts", get(plexus_d_ts))
        .route("/echo", get(ws::echo))
        .route("/chat/{room}", get(ws::chat))
        .route("/connection/websocket", get(ws::native))
        .route("/connection/sse", get(crate::emulation::sse))
        .route(
            "/connection/http_stream",
            post(crate::emulation::http_stream),
        )
        .route("/emulation", post(crate::emulation::emulation))
        .route("/poll/{channel}", get(crate::poll::poll))
        .route("/app/token", get(crate::app::guest_token))
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/api/{method}", crate::api::route(&shared))
        .fallback(not_found)
        .with_state(shared)
}

async fn index() -> Response {
    (
        [(
            CONTENT_TYPE,
            HeaderValue::from_static("text/html; charset=utf-8"),
        )],
        INDEX_HTML,
    )
        .into_response()
}

/// A static asset with an ETag: browsers keep it and revalidate with a cheap 304.
fn asset(headers: &http::HeaderMap, content_type: &'static str, body: &'static str) -> Response {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    body.hash(&mut hasher);
    let etag = format!("\"{:016x}\"", hasher.finish());
    let cache = (
        http::header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache"),
    );
    let etag_header = (
        http::header::ETAG,
        HeaderValue::from_str(&etag).expect("hex is a valid header"),
    );
    let matches = headers
        .get(http::header::IF_NONE_MATCH)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.split(',').any(|tag| tag.trim() == etag));
    if matches {
        return (StatusCode::NOT_MODIFIED, [cache, etag_header]).into_response();
    }
    let content_type = (CONTENT_TYPE, HeaderValue::from_static(content_type));
    ([content_type, cache, etag_header], body).into_response()
}

async fn quotes() -> Response {
    (
        [(
            CONTENT_TYPE,
            HeaderValue::from_static("text/html; charset=utf-8"),
        )],
        QUOTES_HTML,
    )
        .into_response()
}

/// The admin page: it reads everything through the server API, with the key its user types.
async fn admin(headers: http::HeaderMap) -> Response {
    asset(&headers, "text/html; charset=utf-8", ADMIN_HTML)
}

/// What the built-in pages share: colours (light and dark), type, the header, panels, buttons.
async fn plexus_css(headers: http::HeaderMap) -> Response {
    asset(&headers, "text/css; charset=utf-8", PLEXUS_CSS)
}

/// The canvas charts of the quotes and admin pages (an ES module).
async fn charts_js(headers: http::HeaderMap) -> Response {
    asset(&headers, "text/javascript; charset=utf-8", CHARTS_JS)
}

async fn plexus_js(headers: http::HeaderMap) -> Response {
    asset(&headers, "text/javascript; charset=utf-8", PLEXUS_JS)
}

async fn plexus_d_ts(headers: http::HeaderMap) -> Response {
    asset(&headers, "text/plain; charset=utf-8", PLEXUS_D_TS)
}

async fn health(State(shared): State<Arc<Shared>>) -> Response {
    Json(serde_json::json!({
        "status": "ok",
        "connections": shared.limits.open(),
        "channels": shared.node.hub().n_channels(),
    }))
    .into_response()
}

/// 200 when the engine can store and deliver (a Redis that is down makes it 503), so a load
/// balancer sends new clients elsewhere while existing connections stay.
async fn ready(State(shared): State<Arc<Shared>>) -> Response {
    let engine = shared.node.engine();
    let ready = engine.ready();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(serde_json::json!({"ready": ready, "engine": engine.name()})),
    )
        .into_response()
}

async fn metrics(State(shared): State<Arc<Shared>>) -> Response {
    (
        [(
            CONTENT_TYPE,
            HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
        )],
        shared.metrics.render(shared.node.hub().fan_out_totals().0),
    )
        .into_response()
}

async fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        "not found; try /, /echo, /chat/{room}, /connection/websocket, /health or /metrics\n",
    )
        .into_response()
}

/// Serves one accepted connection of the main listener: TLS if configured, then HTTP/1.1 with
/// WebSocket upgrades.
pub(crate) async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    guard: ConnectionGuard,
    shared: Arc<Shared>,
    tls: Option<TlsAcceptor>,
    router: Router,
) {
    let timeout = shared.config.handshake_timeout;
    match tls {
        None => {
            serve_http(
                Tracked::new(stream, guard, shared.config.write_timeout),
                shared,
                router,
            )
            .await
        }
        Some(acceptor) => match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
            Ok(Ok(stream)) => {
                serve_http(
                    Tracked::new(stream, guard, shared.config.write_timeout),
                    shared,
                    router,
                )
                .await
            }
            Ok(Err(error)) => {
                shared.metrics.refused(Refusal::TlsFailed);
                tracing::debug!(%peer, %error, "TLS handshake failed");
            }
            Err(_) => {
                shared.metrics.refused(Refusal::HandshakeTimeout);
                tracing::debug!(%peer, "TLS handshake timed out");
            }
        },
    }
}

async fn serve_http<IO>(io: IO, shared: Arc<Shared>, router: Router)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |request| {
        let mut router = router.clone();
        async move { router.call(request).await }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(shared.config.handshake_timeout);
    let connection = builder
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    tokio::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        () = shared.shutdown.cancelled() => {
            connection.as_mut().graceful_shutdown();
            connection.as_mut().await
        }
    };
    if let Err(error) = result {
        if error.is_timeout() {
            shared.metrics.refused(Refusal::HandshakeTimeout);
        }
        tracing::debug!(%error, "HTTP connection ended with an error");
    }
}

/// Tells a client that was over a connection limit why, then closes.
pub(crate) async fn refuse_http(mut stream: TcpStream, refusal: Refusal) {
    let reason = match refusal {
        Refusal::AddressFull => "too many connections from your address",
        _ => "server is at its connection limit",
    };
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\nretry-after: 5\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{reason}\n",
        reason.len() + 1
    );
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), async {
        let _ = stream.write_all(response.as_bytes()).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

/// The TCP listeners' refusal: one `ERR` line.
pub(crate) async fn refuse_line(mut stream: TcpStream, refusal: Refusal) {
    let line = match refusal {
        Refusal::AddressFull => "ERR too many connections from your address\n",
        _ => "ERR server is at its connection limit\n",
    };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), async {
        let _ = stream.write_all(line.as_bytes()).await;
        let _ = stream.shutdown().await;
    })
    .await;
}
