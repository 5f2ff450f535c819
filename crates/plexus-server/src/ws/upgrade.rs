use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::response::{IntoResponse, Response};
use http::header::{
    CONNECTION, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_EXTENSIONS, SEC_WEBSOCKET_KEY,
    SEC_WEBSOCKET_VERSION, UPGRADE,
};
use http::{HeaderValue, Method, StatusCode};
use hyper_util::rt::TokioIo;
use plexus_protocol::channel::room_channel;
use plexus_protocol::ws::handshake::{
    accepts_deflate, UpgradeError, UpgradeRequest, DEFLATE_RESPONSE,
};

use super::connection::{self, Handler};
use super::raw::RawRoom;
use crate::metrics::Refusal;
use crate::Shared;

/// `GET /echo`: every message comes back unchanged.
pub(crate) async fn echo(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    upgrade(shared, request, Endpoint::Echo)
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
    let deflate = shared.config.websocket_compression
        && headers
            .get_all(SEC_WEBSOCKET_EXTENSIONS)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .any(accepts_deflate);
    let on_upgrade = hyper::upgrade::on(&mut request);
    let task_shared = shared.clone();
    shared.tasks.spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                let handler = match endpoint {
                    Endpoint::Echo => Handler::Echo,
                    Endpoint::Room(channel) => match RawRoom::join(&task_shared, &channel).await {
                        Ok(room) => Handler::Room(room),
                        Err((code, reason)) => {
                            tracing::debug!(%channel, %reason, "raw room subscribe refused");
                            task_shared.metrics.websocket_closed(code);
                            let mut wire = crate::wire::Wire::new(TokioIo::new(upgraded));
                            wire.queue(plexus_protocol::ws::encode_close(code, &reason));
                            wire.finish(std::time::Duration::from_secs(1)).await;
                            return;
                        }
                    },
                };
                connection::run(TokioIo::new(upgraded), task_shared, handler, deflate).await
            }
            Err(error) => tracing::debug!(%error, "WebSocket upgrade did not complete"),
        }
    });
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
