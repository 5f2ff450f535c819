//! The life of one raw WebSocket connection.
//!
//! One task per connection `select!`s over the socket, the connection's outbox (publications
//! from the hub), its heartbeat timer and server shutdown. Rules it keeps:
//! - the server pings every `ping_interval`; a peer that sends nothing at all within
//!   `pong_timeout` after a ping is closed with 1008 "ping timeout";
//! - a protocol violation closes with the code the decoder names (1002, 1007, 1009);
//! - an outbox overflow (a reader too slow for its channel) closes with 3008;
//! - shutdown closes with 1001; every server close waits up to [`CLOSE_TIMEOUT`] for the peer's
//!   close frame, then drops the socket.

use std::future::{pending, poll_fn};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use plexus_core::{ClientInfo, Encoding, Outbox, OutboxState, Publication, Subscriber};
use plexus_protocol::ws::{
    close, deflate, encode_close, encode_frame, Decoder, DecoderConfig, Event, MessageKind, OpCode,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::{sleep_until, Instant};

use crate::wire::{Wire, WireEvent};
use crate::Shared;

/// Stop reading and stop draining the outbox while this much waits to be written.
const HIGH_WATER: usize = 256 * 1024;
/// Messages shorter than this go uncompressed even when deflate was negotiated.
const COMPRESS_MIN: usize = 128;
/// How long the server waits for the peer's close frame after sending its own.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(3);

pub(crate) enum Endpoint {
    Echo,
    /// A raw chat room: the channel it is subscribed to.
    Room(String),
}

/// A room connection's place in the hub.
struct Membership {
    channel: Arc<str>,
    info: Arc<ClientInfo>,
    outbox: Arc<Outbox>,
}

pub(crate) async fn run<IO>(io: IO, shared: Arc<Shared>, endpoint: Endpoint, deflate: bool)
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let metrics = &shared.metrics.websocket;
    metrics.accepted.inc();
    metrics.connections.inc();
    let membership = match endpoint {
        Endpoint::Echo => None,
        Endpoint::Room(channel) => {
            let id = shared.hub.next_connection_id();
            let info = Arc::new(ClientInfo::new(id, "websocket", &format!("ws-{id}")));
            let outbox = Arc::new(Outbox::new(shared.config.outbox_limit));
            let subscriber = Subscriber {
                info: info.clone(),
                outbox: outbox.clone(),
            };
            let channel = shared
                .hub
                .subscribe(&channel, subscriber)
                .expect("a fresh connection id is subscribed nowhere");
            Some(Membership {
                channel,
                info,
                outbox,
            })
        }
    };
    let mut connection = Connection {
        wire: Wire::new(io),
        decoder: Decoder::new(DecoderConfig {
            max_message_size: shared.config.max_message_size,
            deflate,
        }),
        deflate,
        shared: &shared,
        membership: membership.as_ref(),
        closing: None,
        close_received: false,
        read_open: true,
    };
    connection.drive().await;
    connection.wire.finish(Duration::from_secs(1)).await;
    if let Some(membership) = &membership {
        membership.outbox.close();
        shared
            .hub
            .unsubscribe(&membership.channel, membership.info.id);
    }
    metrics.connections.dec();
}

struct Connection<'a, IO> {
    wire: Wire<IO>,
    decoder: Decoder,
    /// permessage-deflate was negotiated.
    deflate: bool,
    shared: &'a Shared,
    membership: Option<&'a Membership>,
    /// When the server has sent its close frame: the moment it stops waiting for the peer's.
    closing: Option<Instant>,
    close_received: bool,
    /// False once the peer closed, broke the protocol or stopped answering.
    read_open: bool,
}

/// What woke the connection.
enum Wake {
    Wire(WireEvent),
    Outbox,
    Shutdown,
    Timer,
}

async fn outbox_ready(membership: Option<&Membership>) {
    match membership {
        Some(membership) => membership.outbox.ready().await,
        None => pending().await,
    }
}

fn opcode(kind: MessageKind) -> OpCode {
    match kind {
        MessageKind::Text => OpCode::Text,
        MessageKind::Binary => OpCode::Binary,
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> Connection<'_, IO> {
    async fn drive(&mut self) {
        let shared = self.shared;
        let config = &shared.config;
        let membership = self.membership;
        let mut next_ping = Instant::now() + config.ping_interval;
        let mut pong_deadline: Option<Instant> = None;
        let timer = sleep_until(next_ping);
        tokio::pin!(timer);
        loop {
            if self.closing.is_some()
                && self.wire.is_drained()
                && (self.close_received || !self.read_open)
            {
                return;
            }
            let deadline = match self.closing {
                Some(deadline) => deadline,
                None => pong_deadline.map_or(next_ping, |pong| pong.min(next_ping)),
            };
            if timer.deadline() != deadline {
                timer.as_mut().reset(deadline);
            }
            let want_read = self.read_open && self.wire.queued() < HIGH_WATER;
            let wire = &mut self.wire;
            let decoder = &mut self.decoder;
            let wake = tokio::select! {
                event = poll_fn(|cx| wire.poll_io(cx, want_read, &mut |bytes| decoder.feed(bytes))) => Wake::Wire(event),
                () = outbox_ready(membership) => Wake::Outbox,
                () = shared.shutdown.cancelled(), if self.closing.is_none() => Wake::Shutdown,
                () = &mut timer => Wake::Timer,
            };
            match wake {
                Wake::Wire(WireEvent::Read(n)) => {
                    shared.metrics.websocket.bytes_in.inc_by(n as u64);
                    pong_deadline = None;
                    self.process_input();
                }
                Wake::Wire(WireEvent::Wrote(n)) => {
                    shared.metrics.websocket.bytes_out.inc_by(n as u64);
                    self.drain_outbox();
                }
                Wake::Wire(WireEvent::Flushed) => self.drain_outbox(),
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
                Wake::Outbox => self.drain_outbox(),
                Wake::Shutdown => self.start_close(close::GOING_AWAY, "server shutting down"),
                Wake::Timer => {
                    let now = Instant::now();
                    if self.closing.is_some_and(|deadline| now >= deadline) {
                        return;
                    }
                    if self.closing.is_none() && pong_deadline.is_some_and(|pong| now >= pong) {
                        self.read_open = false;
                        self.start_close(close::POLICY, "ping timeout");
                    } else if self.closing.is_none() && now >= next_ping {
                        // While a ping is unanswered its deadline stands; no second ping.
                        if pong_deadline.is_none() {
                            self.wire.queue(encode_frame(OpCode::Ping, b"", false));
                            pong_deadline = Some(now + config.pong_timeout);
                        }
                        next_ping = now + config.ping_interval;
                    }
                }
            }
        }
    }

    fn process_input(&mut self) {
        while self.read_open {
            match self.decoder.next_event() {
                Ok(Some(event)) => self.on_event(event),
                Ok(None) => return,
                Err(error) => {
                    tracing::debug!(%error, "closing a WebSocket that broke the protocol");
                    self.read_open = false;
                    self.start_close(error.close_code(), &error.to_string());
                }
            }
        }
    }

    fn on_event(&mut self, event: Event) {
        let metrics = &self.shared.metrics;
        match event {
            Event::Message { kind, data } => {
                if self.closing.is_some() {
                    return; // data after our close frame is discarded (RFC 6455 §5.5.1)
                }
                metrics.websocket.messages_in.inc();
                match self.membership {
                    None => {
                        let frame = self.frame(kind, &data);
                        self.wire.queue(frame);
                        metrics.websocket.messages_out.inc();
                    }
                    Some(membership) => {
                        let publication = Publication::new(
                            membership.channel.clone(),
                            kind,
                            data,
                            Some(membership.info.id),
                        );
                        let report = self.shared.hub.publish(publication);
                        metrics.publications.inc();
                        metrics.deliveries.inc_by(report.delivered as u64);
                        metrics.slow_disconnects.inc_by(report.dropped_slow as u64);
                    }
                }
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
                    // Answer with the peer's own code (RFC 6455 §5.5.1).
                    self.wire
                        .queue(encode_close(code.unwrap_or(close::NORMAL), ""));
                    self.closing = Some(Instant::now() + CLOSE_TIMEOUT);
                    if let Some(membership) = self.membership {
                        membership.outbox.close();
                    }
                }
            }
        }
    }

    /// An echo frame, compressed when that pays.
    fn frame(&self, kind: MessageKind, data: &Bytes) -> Bytes {
        if self.deflate && data.len() >= COMPRESS_MIN {
            encode_frame(opcode(kind), &deflate::compress(data), true)
        } else {
            encode_frame(opcode(kind), data, false)
        }
    }

    /// Moves publications from the outbox to the socket, each encoded once for all subscribers.
    fn drain_outbox(&mut self) {
        let Some(membership) = self.membership else {
            return;
        };
        if self.closing.is_some() {
            return;
        }
        let mut batch = Vec::new();
        let room = HIGH_WATER.saturating_sub(self.wire.queued());
        if membership.outbox.drain(room, &mut batch) == OutboxState::Overflowed {
            // Cut now: what was not sent yet is dropped so the close frame goes out next.
            self.wire.discard_unsent();
            self.start_close(close::SLOW, "slow: could not keep up with messages");
            return;
        }
        self.shared
            .metrics
            .websocket
            .messages_out
            .inc_by(batch.len() as u64);
        for publication in batch {
            let frame = if self.deflate && publication.data.len() >= COMPRESS_MIN {
                publication.encoded(Encoding::WebSocketRawDeflated, |p| {
                    encode_frame(opcode(p.kind), &deflate::compress(&p.data), true)
                })
            } else {
                publication.encoded(Encoding::WebSocketRaw, |p| {
                    encode_frame(opcode(p.kind), &p.data, false)
                })
            };
            self.wire.queue(frame);
        }
    }

    /// Sends the server's close frame once; from then on only the close handshake runs.
    fn start_close(&mut self, code: u16, reason: &str) {
        if self.closing.is_some() {
            return;
        }
        self.shared.metrics.websocket_closed(code);
        self.wire.queue(encode_close(code, reason));
        self.closing = Some(Instant::now() + CLOSE_TIMEOUT);
        if let Some(membership) = self.membership {
            membership.outbox.close();
        }
    }
}
