//! Integration tests: the real server on 127.0.0.1 port 0, driven by real clients
//! (tokio-tungstenite, hand-written frames over a TcpStream, TCP line clients).

mod api;
mod cluster;
mod delta;
mod emulation;
mod filter;
mod jwks;
mod native;
mod operations;
mod poll;
mod protobuf;
mod proxies;
mod rooms;
mod rpc;
mod tcp;
mod tls;
mod util;
mod websocket;
