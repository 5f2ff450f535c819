//! The native protocol: Centrifugo's client protocol v2 (JSON) at `/connection/websocket`, so
//! the official SDKs connect unchanged.
//!
//! [`session::ClientSession`] is the protocol state machine of one client (connect, subscriptions,
//! commands, pushes); it knows nothing of sockets, so every transport (WebSocket, SSE and HTTP
//! streaming) drives the same session. [`json`] turns core values into protocol JSON.

pub(crate) mod json;
pub(crate) mod session;
