//! The idiomatic axum baseline for bench/run.sh: `GET /echo` echoes every message,
//! `GET /chat/{room}` sends every message to everyone in the room (sender included) through a
//! `tokio::sync::broadcast` channel per room.
//!
//! Usage: axum-baseline [--tuned] [--listen 127.0.0.1:PORT]
//!   --tuned: 4 KiB WebSocket read buffer (default 128 KiB) and TCP_NODELAY on accepted sockets.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, State};
use axum::response::Response;
use axum::routing::get;
use axum::serve::ListenerExt;
use axum::Router;
use futures_util::{SinkExt, StreamExt};
use tokio::sync::broadcast;

#[derive(Clone)]
struct App {
    tuned: bool,
    rooms: Arc<Mutex<HashMap<String, broadcast::Sender<Message>>>>,
}

impl App {
    fn upgrade(&self, ws: WebSocketUpgrade) -> WebSocketUpgrade {
        if self.tuned {
            ws.read_buffer_size(4096)
        } else {
            ws
        }
    }
}

async fn echo(State(app): State<App>, ws: WebSocketUpgrade) -> Response {
    app.upgrade(ws).on_upgrade(|mut socket: WebSocket| async move {
        while let Some(Ok(msg)) = socket.recv().await {
            match msg {
                Message::Text(_) | Message::Binary(_) => {
                    if socket.send(msg).await.is_err() {
                        break;
                    }
                }
                Message::Close(_) => break,
                _ => {}
            }
        }
    })
}

async fn chat(State(app): State<App>, Path(room): Path<String>, ws: WebSocketUpgrade) -> Response {
    let tx = {
        let mut rooms = app.rooms.lock().unwrap();
        rooms
            .entry(room)
            .or_insert_with(|| broadcast::channel(1024).0)
            .clone()
    };
    app.upgrade(ws).on_upgrade(move |socket: WebSocket| async move {
        let mut rx = tx.subscribe();
        let (mut sink, mut stream) = socket.split();
        let mut writer = tokio::spawn(async move {
            loop {
                match rx.recv().await {
                    Ok(msg) => {
                        if sink.send(msg).await.is_err() {
                            break;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => break,
                }
            }
        });
        loop {
            tokio::select! {
                msg = stream.next() => match msg {
                    Some(Ok(msg @ (Message::Text(_) | Message::Binary(_)))) => {
                        let _ = tx.send(msg);
                    }
                    Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
                    Some(Ok(_)) => {}
                },
                _ = &mut writer => break,
            }
        }
        writer.abort();
    })
}

#[tokio::main]
async fn main() {
    let mut tuned = false;
    let mut listen = "127.0.0.1:9001".to_owned();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--tuned" => tuned = true,
            "--listen" => listen = args.next().expect("--listen ADDR"),
            other => {
                eprintln!("usage: axum-baseline [--tuned] [--listen ADDR] (not {other})");
                std::process::exit(2);
            }
        }
    }
    let app = App {
        tuned,
        rooms: Arc::default(),
    };
    let router = Router::new()
        .route("/echo", get(echo))
        .route("/chat/{room}", get(chat))
        .with_state(app);
    let listener = tokio::net::TcpListener::bind(&listen).await.expect("bind");
    eprintln!("axum-baseline listening on {listen} (tuned: {tuned})");
    if tuned {
        let listener = listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        axum::serve(listener, router).await.expect("serve");
    } else {
        axum::serve(listener, router).await.expect("serve");
    }
}
