//! The native protocol: Centrifugo's client protocol v2 (JSON or Protobuf) at
//! `/connection/websocket`, so the official SDKs connect unchanged.
//!
//! [`session::ClientSession`] is the protocol state machine of one client (connect, subscriptions,
//! commands, pushes); it knows nothing of sockets, so every transport (WebSocket, SSE and HTTP
//! streaming) drives the same session. [`encode`] turns core values into protocol messages in
//! the client's format.

pub(crate) mod encode;
pub(crate) mod session;
