//! `GET /poll/{channel}?since=EPOCH:OFFSET`: plain HTTP long polling, for clients with nothing
//! else (the notes' "hybrid" path that keeps working when WebSocket does not).
//!
//! - With `since`, the answer holds every publication after that position at once; if there is
//!   none yet, the request waits up to `timeout` seconds (default 25, at most 60) for the next.
//! - Without `since`, it returns the retained history at once.
//! - `next` is the position to pass as `since` next time.
//! - `recovered: false` says publications were lost between `since` and now (the epoch changed,
//!   or the retained window was exceeded): the answer then holds what is retained — never a
//!   silent gap.
//!
//! Auth is the subscribe rules of the native protocol: a connection token in
//! `Authorization: Bearer …` (or `?token=`) unless the namespace allows anonymous subscribers, a
//! subscription token in `?sub_token=` for private namespaces, user-limited channels. The
//! channel's namespace must keep history. Pollers are not members: no presence, no join/leave.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use http::{HeaderMap, StatusCode};
use plexus_auth::{check_subscription, TokenError};
use plexus_core::{
    recovery_is_complete, user_may_subscribe, ClientInfo, Delivery, HistoryPage, HistoryQuery,
    Outbox, Publication, StreamPosition, Subscriber,
};
use plexus_protocol::client::Format;
use serde_json::json;

use crate::native::encode;
use crate::native::session::now_unix;
use crate::Shared;

const DEFAULT_WAIT: Duration = Duration::from_secs(25);
const MAX_WAIT: Duration = Duration::from_secs(60);

fn refuse(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({ "error": message }))).into_response()
}

fn position_text(position: &StreamPosition) -> String {
    format!("{}:{}", position.epoch, position.offset)
}

fn parse_since(text: &str) -> Option<StreamPosition> {
    let (epoch, offset) = text.rsplit_once(':')?;
    Some(StreamPosition {
        offset: offset.parse().ok()?,
        epoch: epoch.into(),
    })
}

fn answer(
    channel: &str,
    publications: &[Arc<Publication>],
    next: &StreamPosition,
    recovered: bool,
) -> Response {
    let publications: Vec<_> = publications
        .iter()
        .map(|p| encode::publication(Format::Json, p))
        .collect();
    Json(json!({
        "channel": channel,
        "publications": publications,
        "next": position_text(next),
        "recovered": recovered,
    }))
    .into_response()
}

fn is_guest(claims: &plexus_auth::ConnectionClaims) -> bool {
    claims
        .meta
        .as_ref()
        .and_then(|meta| meta.get(crate::native::session::GUEST_META))
        .is_some_and(|value| value == &serde_json::Value::Bool(true))
}

/// A refusal: status and message.
type Refusal = (StatusCode, String);

/// Who is asking, by the native protocol's subscribe rules.
async fn authorize(
    shared: &Shared,
    channel: &str,
    headers: &HeaderMap,
    query: &HashMap<String, String>,
) -> Result<String, Refusal> {
    let refuse = |status: StatusCode, message: &str| (status, message.to_owned());
    let options = shared
        .node
        .options(channel)
        .map_err(|error| refuse(StatusCode::NOT_FOUND, &error.to_string()))?;
    if !options.has_history() {
        return Err(refuse(
            StatusCode::BAD_REQUEST,
            "this channel keeps no history, which long polling needs",
        ));
    }
    let bearer = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .map(str::to_owned);
    let token = bearer.or_else(|| query.get("token").cloned());
    // Polling cannot ask the subscribe proxy: such a namespace needs a subscription token here,
    // as a private one does.
    let needs_sub_token = options.private || options.proxy_subscribe;
    let user = match token {
        Some(token) => {
            let verifier = shared
                .verifier
                .as_ref()
                .ok_or_else(|| refuse(StatusCode::UNAUTHORIZED, "invalid token"))?;
            match crate::jwks::verify_connection(shared, verifier, &token, now_unix()).await {
                // A guest of the built-in apps has exactly an anonymous user's rights.
                Ok(claims) if is_guest(&claims) => {
                    if !options.allow_subscribe_for_anonymous || needs_sub_token {
                        return Err(refuse(StatusCode::FORBIDDEN, "permission denied"));
                    }
                    String::new()
                }
                Ok(claims) => claims.sub,
                Err(TokenError::Expired) => {
                    return Err(refuse(StatusCode::UNAUTHORIZED, "token expired"))
                }
                Err(_) => return Err(refuse(StatusCode::UNAUTHORIZED, "invalid token")),
            }
        }
        None if options.allow_subscribe_for_anonymous && !needs_sub_token => String::new(),
        None => {
            return Err(refuse(
                StatusCode::UNAUTHORIZED,
                "a token is required for this channel",
            ))
        }
    };
    if !user_may_subscribe(channel, &user) {
        return Err(refuse(StatusCode::FORBIDDEN, "permission denied"));
    }
    if needs_sub_token {
        let granted = match (query.get("sub_token"), shared.verifier.as_ref()) {
            (Some(token), Some(verifier)) => {
                crate::jwks::verify_subscription(shared, verifier, token, now_unix())
                    .await
                    .is_ok_and(|claims| check_subscription(&claims, &user, channel).is_ok())
            }
            _ => false,
        };
        if !granted {
            return Err(refuse(
                StatusCode::FORBIDDEN,
                "a subscription token is required for this channel",
            ));
        }
    }
    Ok(user)
}

pub(crate) async fn poll(
    State(shared): State<Arc<Shared>>,
    Path(channel): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let user = match authorize(&shared, &channel, &headers, &query).await {
        Ok(user) => user,
        Err((status, message)) => return refuse(status, &message),
    };
    let since = match query.get("since").map(String::as_str) {
        None | Some("") => None,
        Some(text) => match parse_since(text) {
            Some(position) => Some(position),
            None => {
                return refuse(
                    StatusCode::BAD_REQUEST,
                    "since must be EPOCH:OFFSET, as given in `next`",
                )
            }
        },
    };
    let wait = query
        .get("timeout")
        .and_then(|seconds| seconds.parse::<u64>().ok())
        .map_or(DEFAULT_WAIT, |seconds| {
            Duration::from_secs(seconds).min(MAX_WAIT)
        });

    let Some(since) = since else {
        return match shared.node.history(&channel, HistoryQuery::default()).await {
            Ok(page) => answer(&channel, &page.publications, &page.top, true),
            Err(error) => refuse(StatusCode::SERVICE_UNAVAILABLE, &error.to_string()),
        };
    };

    // Observe first, then read: nothing published in between is missed.
    let id = shared.node.hub().next_connection_id();
    let info = Arc::new(ClientInfo::new(
        id,
        crate::new_client_id(),
        user.into(),
        None,
        "poll",
    ));
    let outbox = Arc::new(Outbox::new(shared.config.outbox_limit));
    let subscriber = Subscriber {
        info,
        outbox: outbox.clone(),
        join_leave: false,
    };
    let name = match shared.node.observe(&channel, subscriber).await {
        Ok(name) => name,
        Err(error) => return refuse(StatusCode::SERVICE_UNAVAILABLE, &error.to_string()),
    };
    let response = wait_for_publications(&shared, &name, &since, &outbox, wait).await;
    outbox.close();
    shared.node.stop_observing(&name, id).await;
    response
}

async fn wait_for_publications(
    shared: &Shared,
    channel: &str,
    since: &StreamPosition,
    outbox: &Outbox,
    wait: Duration,
) -> Response {
    let query = HistoryQuery {
        since: Some(since.offset),
        ..HistoryQuery::default()
    };
    let page: HistoryPage = match shared.node.history(channel, query).await {
        Ok(page) => page,
        Err(error) => return refuse(StatusCode::SERVICE_UNAVAILABLE, &error.to_string()),
    };
    if !recovery_is_complete(since, &page) {
        // Another epoch, or the window moved past `since`: say so and hand over what is kept.
        let retained = match shared.node.history(channel, HistoryQuery::default()).await {
            Ok(all) => all,
            Err(error) => return refuse(StatusCode::SERVICE_UNAVAILABLE, &error.to_string()),
        };
        return answer(channel, &retained.publications, &retained.top, false);
    }
    if !page.publications.is_empty() {
        return answer(channel, &page.publications, &page.top, true);
    }
    let deadline = tokio::time::Instant::now() + wait;
    let mut last = page.top.clone();
    loop {
        let mut batch = Vec::new();
        outbox.drain(usize::MAX, &mut batch);
        let fresh: Vec<Arc<Publication>> = batch
            .into_iter()
            .filter_map(|delivery| match delivery {
                Delivery::Publication(publication) if publication.offset > last.offset => {
                    Some(publication)
                }
                _ => None,
            })
            .collect();
        if let Some(newest) = fresh.last() {
            last.offset = newest.offset;
            return answer(channel, &fresh, &last, true);
        }
        if tokio::time::timeout_at(deadline, outbox.ready())
            .await
            .is_err()
        {
            return answer(channel, &[], &last, true);
        }
    }
}
