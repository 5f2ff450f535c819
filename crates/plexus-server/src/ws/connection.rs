//! The life of one WebSocket connection, whatever it speaks.
//!
//! One task per connection `select!`s over the socket, the connection's outbox (deliveries from
//! the hub; heartbeat and shutdown requests from the [`heartbeat`](super::heartbeat) sweep) and,
//! only while it has a deadline, a timer. While it has nothing to write it parks its outbox, and
//! deliveries are written for it by the [`direct`](super::direct) writer without waking it.
//! A [`Handler`] decides what messages and
//! deliveries mean (`/echo`, a raw room, the native protocol); this driver keeps the rules every
//! WebSocket shares:
//! - the server sends the handler's heartbeat every `ping_interval` (asked by the sweep, not by
//!   a timer of its own); a peer that sends
//!   nothing at all within `pong_timeout` after it is closed with the handler's timeout code;
//! - a protocol violation closes with the code the decoder names (1002, 1007, 1009);
//! - an outbox overflow (a reader too slow for its channels) closes with 3008;
//! - shutdown closes with the handler's shutdown code; every server close waits up to
//!   [`CLOSE_TIMEOUT`] for the peer's close frame, then drops the socket.

use std::future::{pending, poll_fn, Future};
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use plexus_core::{Control, Delivery, MessageKind, Outbox, OutboxState};
use plexus_protocol::client::Format;
use plexus_protocol::ws::{
    close, encode_close, encode_frame, Decoder, DecoderConfig, Event, OpCode,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::{sleep_until, Instant, Sleep};

use super::direct::Frames;
use super::heartbeat::Beat;
use super::raw::{data_frame, RawRoom};
use crate::limits::MessageRate;
use crate::native::session::ClientSession;
use crate::wire::{Wire, WireEvent};
use crate::Shared;

/// Stop reading and stop draining the outbox while this much waits to be written.
const HIGH_WATER: usize = 256 * 1024;
/// How long the server waits for the peer's close frame after sending its own.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a close may take in all, while the close frame waits behind data a slow reader is
/// still reading (a reader that stops reading altogether fails the write after
/// `write_timeout`).
const CLOSE_LIMIT: Duration = Duration::from_secs(15);
/// How long a peer's close may wait for the connection's own publishes to be delivered.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(1);

/// What a handler asks the connection to do.
pub(crate) enum Out {
    /// A finished frame (shared by every subscriber of a broadcast).
    Frame(Bytes),
    /// A message to frame (and compress, if negotiated and worth it).
    Message(MessageKind, Bytes),
    /// Close with this code and reason.
    Close(u16, String),
}

/// A handler's asynchronous work, boxed so it takes no room in an idle connection's task.
type Work<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

/// What a connection speaks.
pub(crate) enum Handler {
    /// Every message comes back; the outbox carries only heartbeats.
    Echo(Arc<Outbox>),
    Room(RawRoom),
    /// The native protocol (`/connection/websocket`).
    Native(ClientSession),
}

impl Handler {
    fn outbox(&self) -> &Arc<Outbox> {
        match self {
            Handler::Echo(outbox) => outbox,
            Handler::Room(room) => room.outbox(),
            Handler::Native(session) => session.outbox(),
        }
    }

    /// Whether deliveries may be written directly while the task waits.
    fn may_park(&self) -> bool {
        match self {
            Handler::Native(session) => session.may_park(),
            _ => true,
        }
    }

    /// A moment the handler must act at without input.
    fn deadline(&self) -> Option<Instant> {
        match self {
            Handler::Native(session) => session.deadline(),
            _ => None,
        }
    }

    fn on_deadline<'a>(
        &'a mut self,
        shared: &'a Shared,
        out: &'a mut Vec<Out>,
    ) -> Option<Work<'a>> {
        match self {
            Handler::Native(session) => Some(Box::pin(session.on_deadline(shared, out))),
            _ => None,
        }
    }

    /// Handles a message. Echo and rooms do it at once; a native session's work is
    /// asynchronous and comes back boxed, to be awaited: the session's command futures are large
    /// and rarely running, and inlined every connection's task would carry their size while idle.
    fn on_message<'a>(
        &'a mut self,
        shared: &'a Shared,
        kind: MessageKind,
        data: Bytes,
        out: &'a mut Vec<Out>,
    ) -> Option<Work<'a>> {
        match self {
            Handler::Echo(_) => out.push(Out::Message(kind, data)),
            Handler::Room(room) => room.on_message(shared, kind, data),
            // Protobuf comes in binary messages only: a text one is not a command.
            Handler::Native(session)
                if session.format() == Format::Protobuf && kind == MessageKind::Text =>
            {
                let code = plexus_protocol::client::DisconnectCode::BadRequest;
                out.push(Out::Close(code.close_code(), code.reason().to_owned()));
            }
            Handler::Native(session) => {
                return Some(Box::pin(session.on_message(shared, data, out)))
            }
        }
        None
    }

    /// Turns deliveries into frames; like [`Handler::on_message`], a native session's work
    /// comes back boxed.
    fn on_deliveries<'a>(
        &'a mut self,
        shared: &'a Shared,
        batch: Vec<plexus_core::Delivery>,
        deflate: bool,
        out: &'a mut Vec<Out>,
    ) -> Option<Work<'a>> {
        match self {
            Handler::Echo(_) => {}
            Handler::Room(room) => room.on_deliveries(batch, deflate, out),
            Handler::Native(session) => {
                return Some(Box::pin(session.on_deliveries(shared, batch, deflate, out)))
            }
        }
        None
    }

    fn heartbeat(&self) -> Bytes {
        let frames = match self {
            Handler::Native(session) => Frames::Native(session.format()),
            Handler::Echo(_) | Handler::Room(_) => Frames::Raw,
        };
        heartbeat_frame(frames).clone()
    }

    fn timeout_close(&self) -> (u16, &'static str) {
        match self {
            Handler::Native(_) => (3012, "no pong"),
            _ => (close::POLICY, "ping timeout"),
        }
    }

    fn slow_close(&self) -> (u16, &'static str) {
        match self {
            Handler::Native(_) => (close::SLOW, "slow"),
            _ => (close::SLOW, "slow: could not keep up with messages"),
        }
    }

    fn shutdown_close(&self) -> (u16, &'static str) {
        match self {
            Handler::Native(_) => (3001, "shutdown"),
            _ => (close::GOING_AWAY, "server shutting down"),
        }
    }

    /// Lets the connection's own in-flight publishes land before a close is answered.
    async fn settle(&mut self) {
        if let Handler::Room(room) = self {
            room.settle(SETTLE_TIMEOUT).await;
        }
    }

    fn finish<'a>(&'a mut self, shared: &'a Shared) -> Option<Work<'a>> {
        match self {
            Handler::Echo(outbox) => {
                outbox.close();
                None
            }
            Handler::Room(room) => Some(Box::pin(room.leave(shared))),
            Handler::Native(session) => Some(Box::pin(session.finish(shared))),
        }
    }
}

/// The frame that asks the peer for a sign of life: a WebSocket ping, or, on the native
/// protocol, its empty reply (`{}` in JSON; JavaScript in a browser can see and answer it).
pub(crate) fn heartbeat_frame(frames: Frames) -> &'static Bytes {
    static PING: OnceLock<Bytes> = OnceLock::new();
    static JSON: OnceLock<Bytes> = OnceLock::new();
    static PROTOBUF: OnceLock<Bytes> = OnceLock::new();
    match frames {
        Frames::Raw => PING.get_or_init(|| encode_frame(OpCode::Ping, b"", false)),
        Frames::Native(Format::Json) => {
            JSON.get_or_init(|| encode_frame(OpCode::Text, Format::Json.server_ping(), false))
        }
        Frames::Native(Format::Protobuf) => PROTOBUF
            .get_or_init(|| encode_frame(OpCode::Binary, Format::Protobuf.server_ping(), false)),
    }
}

/// Drives an upgraded socket with `handler` until it closes; `read` is what the peer sent right
/// after its handshake, already read from the socket.
///
/// Everything is set up before the returned future starts, so the future holds the connection's
/// state once, not also the arguments it was made from: it is what every idle connection costs.
pub(crate) fn run<IO>(
    io: IO,
    read: Bytes,
    shared: Arc<Shared>,
    mut handler: Handler,
    deflate: bool,
) -> impl Future<Output = ()>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let metrics = &shared.metrics.websocket;
    metrics.accepted.inc();
    metrics.connections.inc();
    let beat = shared.heartbeats.register(handler.outbox().clone());
    if shared.shutdown.is_cancelled() {
        // Too late for the shutdown sweep to have seen this connection.
        handler.outbox().push_control(Control::Shutdown);
    }
    let rate = MessageRate::new(shared.config.max_messages_per_second);
    let mut connection = Connection {
        beat,
        wire: Wire::new(io),
        decoder: Decoder::new(DecoderConfig {
            max_message_size: shared.config.max_message_size,
            deflate,
        }),
        deflate,
        shared,
        closing: None,
        close_written: false,
        close_received: false,
        read_open: true,
        out: Vec::new(),
        rate,
    };
    if !read.is_empty() {
        connection.decoder.feed(&read);
    }
    // It may be a view of hyper's whole read buffer: free that now, not when the connection ends.
    drop(read);
    async move {
        // Boxed: it runs once, and inline it would add its size to every connection's task.
        Box::pin(connection.process_input(&mut handler)).await;
        connection.drive(&mut handler).await;
        Box::pin(connection.wire.finish(Duration::from_secs(1))).await;
        if let Some(work) = handler.finish(&connection.shared) {
            work.await;
        }
        connection.shared.metrics.websocket.connections.dec();
    }
}

struct Connection<IO> {
    wire: Wire<IO>,
    /// Its place in the heartbeat sweep.
    beat: Arc<Beat>,
    decoder: Decoder,
    /// permessage-deflate was negotiated.
    deflate: bool,
    shared: Arc<Shared>,
    /// Once the server has queued its close frame: the moment it gives up on the close
    /// handshake ([`CLOSE_LIMIT`] after the close was queued; [`CLOSE_TIMEOUT`] after the
    /// frame was written, if that comes first).
    closing: Option<Instant>,
    /// The close frame has gone out to the socket.
    close_written: bool,
    close_received: bool,
    /// False once the peer closed, broke the protocol or stopped answering.
    read_open: bool,
    /// The handler's requests, applied after each call.
    out: Vec<Out>,
    /// Echo and rooms: the peer's messages against `max_messages_per_second` (a native
    /// session limits its commands itself).
    rate: MessageRate,
}

/// What woke the connection.
enum Wake {
    Wire(WireEvent),
    Outbox,
    Timer,
}

/// Resolves at the timer's deadline; never without a timer.
async fn expired(timer: &mut Option<Pin<Box<Sleep>>>) {
    match timer {
        Some(timer) => timer.as_mut().await,
        None => pending().await,
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> Connection<IO> {
    async fn drive(&mut self, handler: &mut Handler) {
        let shared = self.shared.clone();
        let shared = &*shared;
        // Only while there is a deadline (a close handshake, a handler's): idle connections
        // hold no timer.
        let mut timer: Option<Pin<Box<Sleep>>> = None;
        loop {
            if let Some(deadline) = self.closing {
                if self.wire.is_drained() {
                    if self.close_received || !self.read_open {
                        return;
                    }
                    if !self.close_written {
                        self.close_written = true;
                        self.closing = Some(deadline.min(Instant::now() + CLOSE_TIMEOUT));
                    }
                }
            }
            match self.closing.or_else(|| handler.deadline()) {
                Some(deadline) => match timer.as_mut() {
                    Some(timer) if timer.deadline() == deadline => {}
                    Some(timer) => timer.as_mut().reset(deadline),
                    None => timer = Some(Box::pin(sleep_until(deadline))),
                },
                None => timer = None,
            }
            let want_read = self.read_open && self.wire.queued() < HIGH_WATER;
            let wire = &mut self.wire;
            let decoder = &mut self.decoder;
            let outbox = handler.outbox();
            // With nothing of its own to write, the task lets the direct writer (if any) send
            // deliveries while it waits, and takes the socket back before it writes again.
            let parked =
                self.closing.is_none() && wire.is_drained() && handler.may_park() && outbox.park();
            if parked {
                // Waiting with nothing to write: hold no buffers while idle.
                wire.release();
                if self.out.capacity() > 0 {
                    self.out = Vec::new();
                }
            }
            let wake = tokio::select! {
                event = poll_fn(|cx| wire.poll_io(cx, want_read, &mut |bytes| decoder.feed(bytes))) => Wake::Wire(event),
                () = outbox.ready() => Wake::Outbox,
                () = expired(&mut timer) => Wake::Timer,
            };
            if parked {
                outbox.unpark();
                // Deliveries that arrived while parked may be waiting for the flusher: the task
                // owns the socket now, so it writes them (in order, before anything new).
                if !matches!(wake, Wake::Outbox) {
                    self.drain_outbox(handler).await;
                }
            }
            match wake {
                Wake::Wire(WireEvent::Read(n)) => {
                    shared.metrics.websocket.bytes_in.inc_by(n as u64);
                    self.beat.heard();
                    // Boxed: inline, its state would sit in every idle connection's task.
                    Box::pin(self.process_input(handler)).await;
                }
                Wake::Wire(WireEvent::Wrote(n)) => {
                    shared.metrics.websocket.bytes_out.inc_by(n as u64);
                    self.drain_outbox(handler).await;
                }
                Wake::Wire(WireEvent::Flushed) => self.drain_outbox(handler).await,
                Wake::Wire(WireEvent::Eof) => {
                    self.read_open = false;
                    if self.closing.is_none() {
                        // Gone without a close frame (1006 on the peer's side); nothing to say.
                        return;
                    }
                }
                Wake::Wire(WireEvent::Failed(error)) => {
                    tracing::debug!(%error, "WebSocket I/O failed");
                    return;
                }
                Wake::Outbox => self.drain_outbox(handler).await,
                Wake::Timer => {
                    if self
                        .closing
                        .is_some_and(|deadline| Instant::now() >= deadline)
                    {
                        return;
                    }
                    // The handler checks its own deadlines against the clock (cheap, idempotent).
                    if self.closing.is_none() && handler.deadline().is_some() {
                        let mut out = std::mem::take(&mut self.out);
                        if let Some(work) = handler.on_deadline(shared, &mut out) {
                            work.await;
                        }
                        self.apply(&mut out);
                        self.out = out;
                        if self.closing.is_some() {
                            self.read_open = false;
                        }
                    }
                }
            }
        }
    }

    async fn process_input(&mut self, handler: &mut Handler) {
        while self.read_open {
            match self.decoder.next_event() {
                Ok(Some(event)) => self.on_event(handler, event).await,
                Ok(None) => return,
                Err(error) => {
                    tracing::debug!(%error, "closing a WebSocket that broke the protocol");
                    self.read_open = false;
                    self.start_close(error.close_code(), &error.to_string());
                }
            }
        }
    }

    async fn on_event(&mut self, handler: &mut Handler, event: Event) {
        match event {
            Event::Message { kind, data } => {
                if self.closing.is_some() {
                    return; // data after our close frame is discarded (RFC 6455 §5.5.1)
                }
                self.shared.metrics.websocket.messages_in.inc();
                let limit = self.shared.config.max_messages_per_second;
                if !matches!(handler, Handler::Native(_)) && !self.rate.allow(limit) {
                    self.shared.metrics.rate_limited.inc();
                    self.start_close(close::POLICY, "message rate limit exceeded");
                    return;
                }
                let mut out = std::mem::take(&mut self.out);
                if let Some(work) = handler.on_message(&self.shared, kind, data, &mut out) {
                    work.await;
                }
                self.apply(&mut out);
                self.out = out;
            }
            Event::Ping(payload) => {
                if self.closing.is_none() {
                    self.wire.queue(encode_frame(OpCode::Pong, &payload, false));
                }
            }
            Event::Pong(_) => {}
            Event::Close { code, .. } => {
                self.close_received = true;
                self.read_open = false;
                if self.closing.is_none() {
                    // Deliver what is due to the peer (its own messages included) first.
                    Box::pin(handler.settle()).await;
                    Box::pin(self.drain_outbox(handler)).await;
                    // Answer with the peer's own code (RFC 6455 §5.5.1).
                    self.wire
                        .queue(encode_close(code.unwrap_or(close::NORMAL), ""));
                    self.closing = Some(Instant::now() + CLOSE_LIMIT);
                }
            }
        }
    }

    /// Applies a handler's requests.
    fn apply(&mut self, out: &mut Vec<Out>) {
        let mut n_messages = 0;
        for item in out.drain(..) {
            if self.closing.is_some() {
                continue;
            }
            match item {
                Out::Frame(frame) => {
                    n_messages += 1;
                    self.wire.queue(frame);
                }
                Out::Message(kind, data) => {
                    n_messages += 1;
                    self.wire.queue(data_frame(kind, &data, self.deflate));
                }
                Out::Close(code, reason) => self.start_close(code, &reason),
            }
        }
        self.shared
            .metrics
            .websocket
            .messages_out
            .inc_by(n_messages);
    }

    /// Moves deliveries from the outbox to the socket.
    async fn drain_outbox(&mut self, handler: &mut Handler) {
        let outbox = handler.outbox();
        if self.closing.is_some() {
            return;
        }
        let mut batch = Vec::new();
        let room = HIGH_WATER.saturating_sub(self.wire.queued());
        let state = outbox.drain(room, &mut batch);
        // Heartbeats and the rest of a frame the direct writer began are the connection's own
        // business, whatever the handler.
        let (mut ping, mut silent, mut shutdown) = (false, false, false);
        let wire = &mut self.wire;
        batch.retain(|delivery| match delivery {
            Delivery::Control(Control::Rest(rest)) => {
                wire.queue_rest(rest.clone());
                false
            }
            Delivery::Control(Control::Shutdown) => {
                shutdown = true;
                false
            }
            Delivery::Control(Control::Heartbeat) => {
                ping = true;
                false
            }
            Delivery::Control(Control::HeartbeatTimeout) => {
                silent = true;
                false
            }
            _ => true,
        });
        if shutdown {
            let (code, reason) = handler.shutdown_close();
            self.start_close(code, reason);
            return;
        }
        if silent {
            self.read_open = false;
            let (code, reason) = handler.timeout_close();
            self.start_close(code, reason);
            return;
        }
        if ping {
            self.wire.queue(handler.heartbeat());
        }
        if state == OutboxState::Overflowed {
            // Cut now: what was not sent yet is dropped so the close frame goes out next (the
            // rest of a frame already begun is completed first, or the stream would break).
            self.wire.discard_unsent();
            self.shared.metrics.slow_disconnects.inc();
            let (code, reason) = handler.slow_close();
            self.start_close(code, reason);
            return;
        }
        if batch.is_empty() {
            return;
        }
        let mut out = std::mem::take(&mut self.out);
        if let Some(work) = handler.on_deliveries(&self.shared, batch, self.deflate, &mut out) {
            work.await;
        }
        self.apply(&mut out);
        self.out = out;
    }

    /// Sends the server's close frame once; from then on only the close handshake runs.
    fn start_close(&mut self, code: u16, reason: &str) {
        if self.closing.is_some() {
            return;
        }
        self.shared.metrics.websocket_closed(code);
        self.wire.queue(encode_close(code, reason));
        self.closing = Some(Instant::now() + CLOSE_LIMIT);
    }
}

#[cfg(test)]
mod size_probe {
    use super::*;

    /// The size of a future a function returns, without calling it.
    fn output_size<A, B, C, D, E, F, Fut>(_: F) -> usize
    where
        F: FnOnce(A, B, C, D, E) -> Fut,
    {
        std::mem::size_of::<Fut>()
    }

    #[test]
    #[ignore = "a measurement, not a test"]
    fn future_sizes() {
        type Io = crate::tracked::Tracked<super::super::direct::SharedTcp>;
        println!("run::<Io>: {} bytes", output_size(run::<Io>));
        println!(
            "a connection's task (upgrade::serve_upgraded): {} bytes",
            super::super::upgrade::task_future_size()
        );
        println!("Handler: {} bytes", std::mem::size_of::<Handler>());
        println!("Wire<Io>: {} bytes", std::mem::size_of::<Wire<Io>>());
        println!("Decoder: {} bytes", std::mem::size_of::<Decoder>());
        println!("Outbox: {} bytes", std::mem::size_of::<Outbox>());
        println!(
            "ClientInfo: {} bytes",
            std::mem::size_of::<plexus_core::ClientInfo>()
        );
        println!(
            "ClientSession: {} bytes",
            std::mem::size_of::<ClientSession>()
        );
        println!("Beat: {} bytes", std::mem::size_of::<Beat>());
        println!(
            "SocketWriter: {} bytes",
            std::mem::size_of::<super::super::direct::SocketWriter>()
        );
    }
}
