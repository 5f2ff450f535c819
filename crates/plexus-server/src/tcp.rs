//! The seed examples over plain TCP: an echo listener and a line-based chat whose rooms are the
//! same channels as `/chat/{room}`.

use std::future::poll_fn;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use plexus_core::{
    ClientInfo, Control, Delivery, Encoding, MessageKind, Outbox, OutboxState, Publication,
    Subscriber,
};
use plexus_protocol::channel::room_channel;
use plexus_protocol::chat::{message_data, parse_line, render_publication, ChatLine, HELP};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::{sleep_until, Instant};

use crate::limits::MessageRate;
use crate::wire::{Wire, WireEvent};
use crate::Shared;

/// Stop reading while this much waits to be written.
const HIGH_WATER: usize = 256 * 1024;
/// How long a goodbye line may take to be written before the socket is dropped.
const GOODBYE_TIMEOUT: Duration = Duration::from_secs(2);
/// Room every TCP chat client starts in.
pub const DEFAULT_ROOM: &str = "lobby";

/// Echoes every byte back until the peer closes, goes idle or the server shuts down.
pub(crate) async fn echo<IO: AsyncRead + AsyncWrite + Unpin>(io: IO, shared: Arc<Shared>) {
    let metrics = &shared.metrics.tcp_echo;
    metrics.accepted.inc();
    metrics.connections.inc();
    let mut wire = Wire::new(io);
    let mut received = BytesMut::new();
    let idle = sleep_until(Instant::now() + shared.config.tcp_idle_timeout);
    tokio::pin!(idle);
    loop {
        let want_read = wire.queued() < HIGH_WATER;
        let event = tokio::select! {
            event = poll_fn(|cx| wire.poll_io(cx, want_read, &mut |bytes| received.extend_from_slice(bytes))) => event,
            () = &mut idle => break,
            () = shared.shutdown.cancelled() => break,
        };
        match event {
            WireEvent::Read(n) => {
                metrics.bytes_in.inc_by(n as u64);
                wire.queue(received.split().freeze());
                idle.as_mut()
                    .reset(Instant::now() + shared.config.tcp_idle_timeout);
            }
            WireEvent::Wrote(n) => {
                metrics.bytes_out.inc_by(n as u64);
            }
            WireEvent::Flushed => {}
            WireEvent::Eof | WireEvent::Failed(_) => break,
        }
    }
    wire.finish(GOODBYE_TIMEOUT).await;
    metrics.connections.dec();
}

enum Wake {
    Wire(WireEvent),
    Outbox,
    Timer,
    Shutdown,
}

/// One TCP chat client.
struct ChatSession<'a, IO> {
    wire: Wire<IO>,
    shared: &'a Shared,
    info: Arc<ClientInfo>,
    outbox: Arc<Outbox>,
    /// Current room and its channel.
    room: Option<(String, Arc<str>)>,
    /// Bytes of an unfinished line.
    line: BytesMut,
    /// Set once a goodbye was queued: stop reading, write it, close by this deadline.
    leaving: Option<Instant>,
    /// Lines against `max_messages_per_second`.
    rate: MessageRate,
}

/// Runs the line protocol of `plexus_protocol::chat` until `/quit`, EOF, idleness or shutdown.
pub(crate) async fn chat<IO: AsyncRead + AsyncWrite + Unpin>(io: IO, shared: Arc<Shared>) {
    let metrics = &shared.metrics.tcp_chat;
    metrics.accepted.inc();
    metrics.connections.inc();
    let id = shared.node.hub().next_connection_id();
    let info = Arc::new(ClientInfo::new(
        id,
        crate::new_client_id(),
        "".into(),
        None,
        &format!("guest-{id}"),
    ));
    let outbox = Arc::new(Outbox::new(shared.config.outbox_limit));
    shared.node.hub().register(Subscriber {
        info: info.clone(),
        outbox: outbox.clone(),
        join_leave: false,
    });
    let mut session = ChatSession {
        wire: Wire::new(io),
        shared: &shared,
        info,
        outbox,
        room: None,
        line: BytesMut::new(),
        leaving: None,
        rate: MessageRate::new(shared.config.max_messages_per_second),
    };
    session.say(&format!(
        "* welcome to Plexus chat, {}. Commands: /nick NAME, /join ROOM, /who, /quit, /help\n",
        session.info.name()
    ));
    session.join(DEFAULT_ROOM).await;
    session.drive().await;
    session.wire.finish(GOODBYE_TIMEOUT).await;
    session.outbox.close();
    if let Some((_, channel)) = &session.room {
        shared.node.unsubscribe(channel, &session.info).await;
    }
    shared.node.hub().unregister(id);
    metrics.connections.dec();
}

impl<IO: AsyncRead + AsyncWrite + Unpin> ChatSession<'_, IO> {
    fn say(&mut self, text: &str) {
        self.wire.queue(Bytes::copy_from_slice(text.as_bytes()));
    }

    /// Queues a last line and stops reading; the socket closes once it is written.
    fn leave(&mut self, goodbye: &str) {
        if self.leaving.is_none() {
            self.say(goodbye);
            self.leaving = Some(Instant::now() + GOODBYE_TIMEOUT);
            self.outbox.close();
        }
    }

    async fn drive(&mut self) {
        let shared = self.shared;
        let idle_timeout = shared.config.tcp_idle_timeout;
        let mut idle_deadline = Instant::now() + idle_timeout;
        let timer = sleep_until(idle_deadline);
        tokio::pin!(timer);
        loop {
            if self.leaving.is_some() && self.wire.is_drained() {
                return;
            }
            let deadline = self.leaving.unwrap_or(idle_deadline);
            if timer.deadline() != deadline {
                timer.as_mut().reset(deadline);
            }
            let want_read = self.leaving.is_none() && self.wire.queued() < HIGH_WATER;
            let wire = &mut self.wire;
            let line = &mut self.line;
            let outbox = &self.outbox;
            let wake = tokio::select! {
                event = poll_fn(|cx| wire.poll_io(cx, want_read, &mut |bytes| line.extend_from_slice(bytes))) => Wake::Wire(event),
                () = outbox.ready() => Wake::Outbox,
                () = &mut timer => Wake::Timer,
                () = shared.shutdown.cancelled(), if self.leaving.is_none() => Wake::Shutdown,
            };
            match wake {
                Wake::Wire(WireEvent::Read(n)) => {
                    shared.metrics.tcp_chat.bytes_in.inc_by(n as u64);
                    idle_deadline = Instant::now() + idle_timeout;
                    self.process_lines().await;
                }
                Wake::Wire(WireEvent::Wrote(n)) => {
                    shared.metrics.tcp_chat.bytes_out.inc_by(n as u64);
                    self.process_lines().await;
                    self.drain_outbox();
                }
                Wake::Wire(WireEvent::Flushed) | Wake::Outbox => self.drain_outbox(),
                Wake::Wire(WireEvent::Eof | WireEvent::Failed(_)) => return,
                Wake::Timer if self.leaving.is_some() => return, // the goodbye did not get out
                Wake::Timer => self.leave(&format!(
                    "* disconnected: idle for {}\n",
                    humantime::format_duration(idle_timeout)
                )),
                Wake::Shutdown => self.leave("* server shutting down\n"),
            }
        }
    }

    async fn process_lines(&mut self) {
        let max = self.shared.config.max_message_size;
        // Answers wait in the socket queue; past the high-water mark, stop and resume after
        // writes, so a flood of commands cannot grow the queue without bound.
        while self.leaving.is_none() && self.wire.queued() < HIGH_WATER {
            let end = self.line.iter().position(|&byte| byte == b'\n');
            if end.unwrap_or(self.line.len()) > max {
                self.leave(&format!("ERR line longer than {max} bytes\n"));
                break;
            }
            let Some(end) = end else {
                break;
            };
            if !self.rate.allow(self.shared.config.max_messages_per_second) {
                self.shared.metrics.rate_limited.inc();
                self.leave("ERR message rate limit exceeded\n");
                break;
            }
            let line = self.line.split_to(end + 1);
            self.handle_line(&line[..end]).await;
        }
        if self.line.is_empty() {
            self.line = BytesMut::new();
        }
    }

    async fn handle_line(&mut self, raw: &[u8]) {
        let metrics = &self.shared.metrics;
        match parse_line(raw) {
            Ok(ChatLine::Empty) => {}
            Ok(ChatLine::Message(text)) => {
                metrics.tcp_chat.messages_in.inc();
                let Some((_, channel)) = &self.room else {
                    return;
                };
                let data = message_data(&self.info.name(), text);
                let publication = Publication::new(
                    channel.clone(),
                    MessageKind::Text,
                    data.into(),
                    Some(self.info.descriptor(None)),
                );
                match self.shared.node.publish(publication) {
                    // Ordered now; a chat line needs no durability acknowledgement.
                    Ok(acknowledgement) => drop(acknowledgement),
                    Err(error) => self.say(&format!("ERR {error}\n")),
                }
                metrics.publications.inc();
            }
            Ok(ChatLine::Nick(nick)) => {
                self.info.set_name(nick);
                self.say(&format!("* you are now {nick}\n"));
            }
            Ok(ChatLine::Join(room)) => self.join(room).await,
            Ok(ChatLine::Who) => {
                let Some((room, channel)) = &self.room else {
                    return;
                };
                let names: Vec<String> = self
                    .shared
                    .node
                    .hub()
                    .presence(channel)
                    .iter()
                    .map(|info| info.name().to_string())
                    .collect();
                let text = format!("* in {room}: {}\n", names.join(", "));
                self.say(&text);
            }
            Ok(ChatLine::Quit) => self.leave("* bye\n"),
            Ok(ChatLine::Help) => self.say(HELP),
            Err(error) => self.say(&format!("ERR {error}\n")),
        }
    }

    async fn join(&mut self, room: &str) {
        if self
            .room
            .as_ref()
            .is_some_and(|(current, _)| current == room)
        {
            self.say(&format!("* already in {room}\n"));
            return;
        }
        let channel = room_channel(room).expect("room names are checked by the parser");
        let subscriber = Subscriber {
            info: self.info.clone(),
            outbox: self.outbox.clone(),
            join_leave: false,
        };
        let node = &self.shared.node;
        if node
            .options(&channel)
            .is_ok_and(|options| !options.open_to_raw_clients())
        {
            self.say(&format!(
                "ERR cannot join {room}: {}\n",
                crate::ws::NATIVE_ONLY
            ));
            return;
        }
        let channel = match node.subscribe(&channel, subscriber, None, None).await {
            Ok(subscription) => subscription.channel,
            Err(error) => {
                self.say(&format!("ERR cannot join {room}: {error}\n"));
                return;
            }
        };
        if let Some((_, previous)) = self.room.take() {
            node.unsubscribe(&previous, &self.info).await;
        }
        let n_here = node.hub().presence(&channel).len();
        self.room = Some((room.to_owned(), channel));
        self.say(&format!(
            "* you are {} in room {room} ({n_here} here)\n",
            self.info.name()
        ));
    }

    fn drain_outbox(&mut self) {
        // Keep draining while a batch wrote nothing (all of it this client's own lines): no later
        // write would wake us for what is left, and the outbox wakes only on empty → non-empty.
        while self.leaving.is_none() && self.wire.queued() < HIGH_WATER {
            if self.drain_once() > 0 || self.outbox.is_empty() {
                break;
            }
        }
    }

    /// One batch from the outbox to the socket; returns how many lines it queued.
    fn drain_once(&mut self) -> u64 {
        let mut batch = Vec::new();
        let room = HIGH_WATER.saturating_sub(self.wire.queued());
        if self.outbox.drain(room, &mut batch) == OutboxState::Overflowed {
            self.wire.discard_unsent();
            self.shared.metrics.slow_disconnects.inc();
            self.leave("* disconnected: too slow to keep up with the room\n");
            return 1;
        }
        let mut n_sent = 0;
        for delivery in batch {
            match delivery {
                Delivery::Publication(publication) | Delivery::Chained { publication, .. } => {
                    if publication.publisher() == Some(&*self.info.client) {
                        continue; // TCP chat convention: your own lines are not echoed back
                    }
                    let line = publication
                        .encoded(Encoding::ChatLine, |p| {
                            render_publication(&p.data, p.kind == MessageKind::Text).into()
                        })
                        .clone();
                    self.wire.queue(line);
                    n_sent += 1;
                }
                Delivery::Join(_) | Delivery::Leave(_) => {}
                Delivery::Control(Control::Disconnect { reason, .. }) => {
                    self.leave(&format!("* disconnected by the server: {reason}\n"));
                    return n_sent + 1;
                }
                Delivery::Control(Control::Unsubscribe { channel, .. }) => {
                    if self
                        .room
                        .as_ref()
                        .is_some_and(|(_, current)| *current == channel)
                    {
                        self.room = None;
                        self.say(&format!(
                            "* the server removed you from {channel}; /join a room\n"
                        ));
                    }
                }
                // No positions to resynchronise on a line stream; its idle rules are its own, and
                // it has no expiry.
                Delivery::Control(
                    Control::Subscribe { .. }
                    | Control::Resync { .. }
                    | Control::Refresh { .. }
                    | Control::Frame(_)
                    | Control::Reply(_)
                    | Control::Rest(_)
                    | Control::Heartbeat
                    | Control::HeartbeatTimeout
                    | Control::Shutdown,
                ) => {}
            }
        }
        self.shared.metrics.tcp_chat.messages_out.inc_by(n_sent);
        n_sent
    }
}
