//! The life of one SSE or HTTP-streaming connection: the native WebSocket driver's rules over a
//! response body that only the server writes, with commands arriving through `/emulation`.
//!
//! One task per stream `select!`s over its commands, its outbox, its heartbeat timer, server
//! shutdown and the body's room. Replies queue here (bounded in bytes like a WebSocket's wire)
//! and go to hyper through a small channel, each as soon as there is room; a client gone (hyper
//! dropped the body: closed, or a write stalled for `write_timeout`) ends the task.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Bytes;
use hyper::body::Frame;
use plexus_core::OutboxState;
use plexus_protocol::client::{
    codes::disconnect_code_reconnects, Disconnect, DisconnectCode, Format, PushBody,
};
use tokio::sync::mpsc;
use tokio::time::{sleep_until, Instant};

use super::Kind;
use crate::native::session::ClientSession;
use crate::ws::Out;
use crate::Shared;

/// Stop draining the outbox while this much waits to be written.
const HIGH_WATER: usize = 256 * 1024;
/// How long the last replies (the disconnect push) may take to be handed to hyper.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(3);

/// The response body: chunks from the stream's task, ended when the task drops its sender.
pub(crate) struct ReplyBody {
    chunks: mpsc::Receiver<Bytes>,
}

impl ReplyBody {
    pub(super) fn new(chunks: mpsc::Receiver<Bytes>) -> ReplyBody {
        ReplyBody { chunks }
    }
}

impl hyper::body::Body for ReplyBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.chunks
            .poll_recv(cx)
            .map(|chunk| chunk.map(|chunk| Ok(Frame::data(chunk))))
    }
}

/// Runs one stream: its connect command first, then the session until it closes or the client
/// goes away.
pub(super) async fn run(
    shared: Arc<Shared>,
    kind: Kind,
    session_id: Arc<str>,
    mut session: ClientSession,
    connect: Bytes,
    mut commands: mpsc::Receiver<Bytes>,
    body: mpsc::Sender<Bytes>,
) {
    let format = session.format();
    let mut stream = Stream {
        kind,
        format,
        shared: &shared,
        body,
        queue: VecDeque::new(),
        queued: 0,
        closing: false,
        gone: false,
    };
    let mut out = Vec::new();
    session.on_message(&shared, connect, &mut out).await;
    stream.apply(&mut out);
    if !stream.closing {
        stream.drive(&mut session, &mut commands).await;
    }
    shared.emulation.remove(&session_id);
    drop(commands);
    stream.finish().await;
    session.finish(&shared).await;
}

struct Stream<'a> {
    kind: Kind,
    format: Format,
    shared: &'a Shared,
    body: mpsc::Sender<Bytes>,
    /// Chunks not yet handed to hyper.
    queue: VecDeque<Bytes>,
    /// Bytes in `queue`.
    queued: usize,
    /// The disconnect push is queued: nothing more is sent.
    closing: bool,
    /// The client is gone (the body was dropped).
    gone: bool,
}

/// What woke the stream.
enum Wake {
    Command(Option<Bytes>),
    Outbox,
    Shutdown,
    Timer,
    /// The body has room (true) or was dropped (false).
    Body(bool),
}

/// Resolves when the body has room for a queued chunk (true), or when the client is gone
/// (false).
async fn body_ready(body: &mpsc::Sender<Bytes>, has_queued: bool) -> bool {
    if has_queued {
        body.reserve().await.is_ok()
    } else {
        body.closed().await;
        false
    }
}

impl Stream<'_> {
    async fn drive(&mut self, session: &mut ClientSession, commands: &mut mpsc::Receiver<Bytes>) {
        let shared = self.shared;
        let config = &shared.config;
        let mut next_ping = Instant::now() + config.ping_interval;
        let mut pong_deadline: Option<Instant> = None;
        let timer = sleep_until(next_ping);
        tokio::pin!(timer);
        let mut out = Vec::new();
        loop {
            self.pump();
            if self.closing || self.gone {
                return;
            }
            let deadline = [pong_deadline, session.deadline()]
                .into_iter()
                .flatten()
                .fold(next_ping, Instant::min);
            if timer.deadline() != deadline {
                timer.as_mut().reset(deadline);
            }
            let want_outbox = self.queued < HIGH_WATER;
            let has_queued = !self.queue.is_empty();
            let outbox = session.outbox().clone();
            let wake = tokio::select! {
                command = commands.recv() => Wake::Command(command),
                () = outbox.ready(), if want_outbox => Wake::Outbox,
                () = shared.shutdown.cancelled() => Wake::Shutdown,
                () = &mut timer => Wake::Timer,
                ready = body_ready(&self.body, has_queued) => Wake::Body(ready),
            };
            match wake {
                Wake::Command(Some(data)) => {
                    // Anything from the client, a pong included, is a sign of life.
                    pong_deadline = None;
                    session.on_message(shared, data, &mut out).await;
                    self.apply(&mut out);
                }
                Wake::Command(None) => return,
                Wake::Outbox => {
                    let mut batch = Vec::new();
                    let room = HIGH_WATER.saturating_sub(self.queued);
                    if outbox.drain(room, &mut batch) == OutboxState::Overflowed {
                        // Cut now: what was not sent yet is dropped so the disconnect goes next.
                        self.queue.clear();
                        self.queued = 0;
                        shared.metrics.slow_disconnects.inc();
                        self.close(DisconnectCode::Slow.close_code(), "slow");
                        continue;
                    }
                    if !batch.is_empty() {
                        session.on_deliveries(shared, batch, false, &mut out).await;
                        self.apply(&mut out);
                    }
                }
                Wake::Shutdown => self.close(DisconnectCode::Shutdown.close_code(), "shutdown"),
                Wake::Timer => {
                    let now = Instant::now();
                    // The session checks its own deadlines against the clock.
                    if session.deadline().is_some() {
                        session.on_deadline(shared, &mut out).await;
                        self.apply(&mut out);
                    }
                    if self.closing {
                        continue;
                    }
                    if pong_deadline.is_some_and(|pong| now >= pong) {
                        self.close(DisconnectCode::NoPong.close_code(), "no pong");
                    } else if now >= next_ping {
                        // While a ping is unanswered its deadline stands; no second ping.
                        if pong_deadline.is_none() {
                            self.reply(Bytes::from_static(self.format.server_ping()));
                            pong_deadline = Some(now + config.pong_timeout);
                        }
                        next_ping = now + config.ping_interval;
                    }
                }
                Wake::Body(true) => {} // pumped at the top of the loop
                Wake::Body(false) => self.gone = true,
            }
        }
    }

    /// Applies the session's requests: replies are queued, a close becomes a disconnect push.
    fn apply(&mut self, out: &mut Vec<Out>) {
        for item in out.drain(..) {
            if self.closing {
                continue;
            }
            match item {
                // Protobuf replies carry their lengths: the message goes as it is.
                Out::Message(_, data) if self.format == Format::Protobuf => self.reply(data),
                Out::Message(_, data) => {
                    // One message may hold several replies, one per line.
                    let mut start = 0;
                    for end in memchr_all(&data) {
                        if end > start {
                            self.reply(data.slice(start..end));
                        }
                        start = end + 1;
                    }
                    if start < data.len() {
                        self.reply(data.slice(start..));
                    }
                }
                // A finished WebSocket frame: not for a stream (the session sends none).
                Out::Frame(_) => {}
                Out::Close(code, reason) => self.close(code, &reason),
            }
        }
    }

    /// Queues one reply (or, in Protobuf, any number) in the stream's framing.
    fn reply(&mut self, reply: Bytes) {
        match (self.kind, self.format) {
            (Kind::Sse, _) => {
                self.push(Bytes::from_static(b"data: "));
                self.push(reply);
                self.push(Bytes::from_static(b"\n\n"));
            }
            (Kind::HttpStream, Format::Json) => {
                self.push(reply);
                self.push(Bytes::from_static(b"\n"));
            }
            (Kind::HttpStream, Format::Protobuf) => self.push(reply),
        }
    }

    fn push(&mut self, chunk: Bytes) {
        self.queued += chunk.len();
        self.queue.push_back(chunk);
    }

    /// Queues the `disconnect` push, the stream's last reply.
    fn close(&mut self, code: u16, reason: &str) {
        if self.closing {
            return;
        }
        let push = self.format.encode_push(
            "",
            &PushBody::Disconnect(Disconnect {
                code: u32::from(code),
                reason: reason.to_owned(),
                reconnect: disconnect_code_reconnects(u32::from(code)),
            }),
        );
        self.reply(push.into());
        self.closing = true;
    }

    /// Hands queued chunks to hyper while the body has room.
    fn pump(&mut self) {
        while let Some(chunk) = self.queue.pop_front() {
            let len = chunk.len();
            match self.body.try_send(chunk) {
                Ok(()) => self.queued -= len,
                Err(mpsc::error::TrySendError::Full(chunk)) => {
                    self.queue.push_front(chunk);
                    return;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    self.gone = true;
                    self.queue.clear();
                    self.queued = 0;
                    return;
                }
            }
        }
    }

    /// Hands over what is left (up to [`CLOSE_TIMEOUT`]), then ends the body.
    async fn finish(mut self) {
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
            loop {
                self.pump();
                if self.gone || self.queue.is_empty() {
                    return;
                }
                if self.body.reserve().await.is_err() {
                    return;
                }
            }
        })
        .await;
    }
}

/// Positions of `\n` in `data`.
fn memchr_all(data: &[u8]) -> impl Iterator<Item = usize> + '_ {
    data.iter()
        .enumerate()
        .filter_map(|(at, &byte)| (byte == b'\n').then_some(at))
}
