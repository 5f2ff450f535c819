//! What the built-in pages need from the server: guest tokens (`GET /app/token`) and the demo
//! quotes publisher.
//!
//! A guest token names a visitor of the built-in chat page (`sub` = `guest-…`, `info.name`) and
//! carries the server-only `meta.plexus_guest` mark: the session then grants it exactly what an
//! anonymous connection may do in each namespace, so handing these out widens no access. It
//! exists so the zero-configuration chat page can connect through the native protocol (with
//! presence, history and recovery) while `allow_anonymous_connect_without_token` stays off.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use http::{HeaderValue, StatusCode};
use plexus_core::{ChannelOptions, MessageKind, Publication};
use serde_json::json;

use crate::native::session::{now_unix, GUEST_META};
use crate::Shared;

/// Lifetime of a guest token; plexus.js fetches a new one with `getToken` before it ends.
const GUEST_TTL: Duration = Duration::from_secs(3600);

fn valid_name(name: &str) -> bool {
    let n_chars = name.chars().count();
    (1..=32).contains(&n_chars) && !name.chars().any(|c| c.is_control())
}

/// `GET /app/token?name=NAME`: a guest connection token for the built-in pages.
pub(crate) async fn guest_token(
    State(shared): State<Arc<Shared>>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let name = query.get("name").map(|name| name.trim()).unwrap_or("");
    if !valid_name(name) {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "name must be 1-32 characters"})),
        )
            .into_response();
    }
    let user = format!("guest-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let token = plexus_auth::mint_hs256(
        &shared.token_hmac_secret,
        &plexus_auth::MintRequest {
            sub: user.clone(),
            ttl: Some(GUEST_TTL),
            info: Some(json!({ "name": name })),
            meta: Some(json!({ GUEST_META: true })),
            now_unix: now_unix(),
            ..plexus_auth::MintRequest::default()
        },
    );
    let mut response = Json(json!({"token": token, "user": user, "name": name})).into_response();
    response.headers_mut().insert(
        http::header::CACHE_CONTROL,
        HeaderValue::from_static("no-store"),
    );
    response
}

/// Streams made-up prices to `quotes:{SYMBOL}` every half second, only while the channel has
/// subscribers on this node, and only if the `quotes` namespace is the built-in one (a
/// configured `quotes` namespace is the operator's, and the demo stays out of it).
pub(crate) async fn quotes_demo(shared: Arc<Shared>) {
    if shared.node.options("quotes:x").ok() != Some(&ChannelOptions::quotes()) {
        return;
    }
    let mut prices: HashMap<Arc<str>, f64> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut step: u64 = 0;
    loop {
        tokio::select! {
            () = shared.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let live: Vec<Arc<str>> = shared
            .node
            .hub()
            .channels()
            .into_iter()
            .filter(|(name, n_subscribers)| name.starts_with("quotes:") && *n_subscribers > 0)
            .map(|(name, _)| name)
            .collect();
        prices.retain(|channel, _| live.contains(channel));
        for channel in live {
            step = step.wrapping_add(1);
            let symbol = &channel["quotes:".len()..];
            let price = prices.entry(channel.clone()).or_insert_with(|| {
                // A starting price from the symbol, so each looks different but stable.
                50.0 + f64::from(
                    symbol.bytes().fold(0u32, |acc, b| {
                        acc.wrapping_mul(31).wrapping_add(u32::from(b))
                    }) % 200,
                )
            });
            // A small pseudo-random walk (no RNG needed for a demo).
            let noise = ((step.wrapping_mul(2654435761) >> 7) % 1000) as f64 / 1000.0 - 0.5;
            *price = (*price * (1.0 + noise * 0.004)).max(0.01);
            let data = json!({
                "symbol": symbol,
                "price": (*price * 100.0).round() / 100.0,
                "t": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64),
            });
            let publication = Publication::new(
                channel.clone(),
                MessageKind::Text,
                data.to_string().into(),
                None,
            );
            if let Ok(acknowledgement) = shared.node.publish(publication) {
                drop(acknowledgement);
                shared.metrics.publications.inc();
            }
        }
    }
}
