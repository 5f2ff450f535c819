//! The fan-out subscribers' receive path, kept lean so that the generator is never the slower
//! side of a burst (one publication, N deliveries at once) and the latency it measures is the
//! server's.
//!
//! Each subscriber is opened by a tokio task (TCP connect, a hand-written WebSocket upgrade, for
//! the native protocol `connect` and `subscribe` answered), and then handed to one OS thread that
//! reads every subscriber: one `epoll_wait` (mio, edge-triggered) for all ready sockets, one
//! `read` per socket into a reused buffer (a short read means the socket is drained), short naps
//! rather than a blocking wait for a moment after the last event ([`NAP_WINDOW`]), frames
//! parsed where they were read ([`FrameReader`]), the receive time taken right after the read.
//! Pings are answered (a WebSocket ping with a masked pong, a native `{}` with `{}`), a close
//! from the server or a bad frame ends that subscriber as dropped with its reason, and at the end
//! every subscriber closes with a masked close frame and waits (briefly) for the server's.
//!
//! The upgrade is hand-written rather than tungstenite's so that no byte the server sent after
//! it can stay behind in a buffer we cannot reach: what came with the `101` response is the
//! first input of the frame reader.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::io::{self, Read, Write};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token, Waker};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::Shared;
use crate::client::{
    interpret_binary, interpret_native, interpret_text, io_reason, native_hello,
    native_hello_replies, Endpoint, OpenError, Protocol, Received,
};
use crate::http::parse_head;
use crate::latency::Latencies;
use crate::seq::{SeqTracker, PROBE};
use crate::wsframe::{self, Frame, FrameReader, BINARY, TEXT};
use plexus_protocol::client::{Format, PROTOBUF_SUBPROTOCOL};

/// How long the end of a run waits for the servers' answers to our close frames.
const CLOSE_WAIT: Duration = Duration::from_secs(3);

/// The token of the waker that says a command is waiting.
const WAKE: Token = Token(usize::MAX);

/// One read's worth: large enough that a burst to one socket is read in one call.
const READ_BUFFER: usize = 256 * 1024;

/// For how long after the last event the reader naps and polls instead of blocking in
/// `epoll_wait`. During a burst the server writes the next socket a few microseconds later; a
/// reader blocked in `epoll_wait` must be woken for it, and on loopback that waking (an IPI to
/// an idle core, a VM exit on this machine) is done, and paid for, by the server's write. A
/// reader that naps ([`NAP`]) and then polls without blocking is woken by its own timer, and
/// finds the sockets written meanwhile ready together. Measured at 1,000 × 50: blocking at once
/// made the server's CPU per delivery ~10 % higher and the p99 ~1 ms longer; spinning instead of
/// napping gave the same server numbers but doubled this thread's CPU at 10,000 × 5.
const NAP_WINDOW: Duration = Duration::from_millis(1);

/// One nap (plus the kernel's timer slack, 50 µs by default): about the most a delivery waits
/// for the reader during a burst.
const NAP: Duration = Duration::from_micros(20);

/// One subscriber, opened: its socket and its state, with the bytes that came after the upgrade
/// (or after the native replies) still to be parsed.
pub struct Opened {
    stream: tokio::net::TcpStream,
    state: Subscriber,
    leftover: Vec<u8>,
}

/// Opens subscriber number `index`: TCP, the WebSocket upgrade, and for the native protocol
/// `connect` and `subscribe` answered; each step within the endpoint's timeout.
pub async fn open(endpoint: &Endpoint, index: u64, shared: &Shared) -> Result<Opened, OpenError> {
    let mut stream = endpoint.connect(index).await?;
    let leftover = tokio::time::timeout(endpoint.timeout, upgrade(&mut stream, endpoint))
        .await
        .map_err(|_| OpenError::Timeout("WebSocket handshake"))??;
    let mut opened = Opened {
        stream,
        state: Subscriber::new(&endpoint.protocol),
        leftover,
    };
    if let Protocol::Native {
        token,
        channel,
        tags_filter,
        format,
        delta,
    } = &endpoint.protocol
    {
        let hello = native_hello(
            *format,
            token,
            channel.as_deref(),
            tags_filter.as_deref(),
            *delta,
        );
        let mut out = Vec::new();
        let opcode = if format.is_binary() { BINARY } else { TEXT };
        wsframe::push_masked(&mut out, opcode, &hello);
        tokio::time::timeout(
            endpoint.timeout,
            opened.native_hello(&out, channel.is_some(), index, shared),
        )
        .await
        .map_err(|_| OpenError::Timeout("native connect"))??;
    }
    Ok(opened)
}

/// The client side of the upgrade (RFC 6455 §4.1); returns the bytes read past the response.
async fn upgrade(
    stream: &mut tokio::net::TcpStream,
    endpoint: &Endpoint,
) -> Result<Vec<u8>, OpenError> {
    let key = upgrade_key();
    let subprotocol = match &endpoint.protocol {
        Protocol::Native {
            format: Format::Protobuf,
            ..
        } => format!("Sec-WebSocket-Protocol: {PROTOBUF_SUBPROTOCOL}\r\n"),
        _ => String::new(),
    };
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n{subprotocol}\r\n",
        endpoint.target.path, endpoint.target.authority
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(OpenError::from_io)?;
    let mut buffer = Vec::with_capacity(1024);
    loop {
        if let Some(head) =
            parse_head(&buffer).map_err(|error| OpenError::Ws(format!("handshake: {error}")))?
        {
            if head.status != 101 {
                return Err(OpenError::Http(head.status));
            }
            let expected = plexus_protocol::ws::handshake::accept_key(&key);
            // The head is UTF-8: `parse_head` checked.
            let text = String::from_utf8_lossy(&buffer[..head.len]);
            let accepted = text.split("\r\n").any(|line| {
                line.split_once(':').is_some_and(|(name, value)| {
                    name.eq_ignore_ascii_case("sec-websocket-accept") && value.trim() == expected
                })
            });
            if !accepted {
                return Err(OpenError::Ws(
                    "handshake: missing or wrong Sec-WebSocket-Accept".into(),
                ));
            }
            return Ok(buffer.split_off(head.len));
        }
        if stream
            .read_buf(&mut buffer)
            .await
            .map_err(OpenError::from_io)?
            == 0
        {
            return Err(OpenError::Ws(
                "connection closed during the handshake".into(),
            ));
        }
    }
}

/// A `Sec-WebSocket-Key`: 16 random bytes, base64.
fn upgrade_key() -> String {
    let mut bytes = [0u8; 16];
    for half in bytes.chunks_mut(8) {
        let mut hasher = RandomState::new().build_hasher();
        hasher.write_u8(1);
        half.copy_from_slice(&hasher.finish().to_ne_bytes());
    }
    base64_16(&bytes)
}

/// Standard base64 of 16 bytes (24 characters, `==` at the end).
fn base64_16(bytes: &[u8; 16]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(24);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, byte)| n | u32::from(*byte) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(char::from(ALPHABET[(n >> (18 - 6 * i) & 63) as usize]));
        }
    }
    out.push_str("==");
    out
}

impl Opened {
    /// Sends `connect` and `subscribe`, and reads until both are answered. (Publications that
    /// came in the same read as the replies are counted here: the reader thread never sees them.)
    async fn native_hello(
        &mut self,
        hello: &[u8],
        subscribes: bool,
        index: u64,
        shared: &Shared,
    ) -> Result<(), OpenError> {
        self.state.awaiting = if subscribes { 2 } else { 1 };
        self.stream
            .write_all(hello)
            .await
            .map_err(OpenError::from_io)?;
        let mut batch = Batch::default();
        let mut input = std::mem::take(&mut self.leftover);
        loop {
            // Once the replies are in, what follows them is left for the reader thread.
            let result = self.state.on_bytes(&input, shared.now(), &mut batch);
            input.clear();
            for nanos in batch.latencies.drain(..) {
                shared.latencies.record(index, Duration::from_nanos(nanos));
            }
            shared.deliveries.fetch_add(batch.deliveries, Relaxed);
            shared.ready.fetch_add(batch.ready, Relaxed);
            shared.last_delivery.fetch_max(batch.last_delivery, Relaxed);
            batch = Batch::default();
            if !self.state.outgoing.is_empty() {
                self.stream
                    .write_all(&self.state.outgoing)
                    .await
                    .map_err(OpenError::from_io)?;
                self.state.outgoing.clear();
            }
            match result {
                Ok(Status::Open) => {}
                Ok(Status::Finished) => return Err(OpenError::Ws("connection closed".into())),
                Err(reason) => return Err(OpenError::Ws(reason)),
            }
            if self.state.awaiting == 0 {
                return Ok(());
            }
            if self
                .stream
                .read_buf(&mut input)
                .await
                .map_err(OpenError::from_io)?
                == 0
            {
                return Err(OpenError::Ws("connection closed".into()));
            }
        }
    }
}

/// Whether a subscriber goes on after what it just read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Open,
    /// The closing handshake we started is complete.
    Finished,
}

/// What the reads of one round delivered, added to the shared counters once per round.
#[derive(Debug, Default)]
struct Batch {
    deliveries: u64,
    ready: u64,
    /// Receive time of the last measured delivery.
    last_delivery: u64,
    /// Latencies in nanoseconds, recorded in the reader's histogram after the round.
    latencies: Vec<u64>,
}

/// One subscriber's state between reads.
struct Subscriber {
    protocol: Protocol,
    frames: FrameReader,
    /// Native replies (`connect`, `subscribe`) still awaited.
    awaiting: u32,
    tracker: SeqTracker,
    /// Whether it has seen a probe or a measured message.
    ready: bool,
    /// Frames to send: pongs, `{}` answers, a close.
    outgoing: Vec<u8>,
    /// We sent our close frame: what comes now is only waited through.
    closing: bool,
    /// With delta compression: the data of the last publication, the next delta's base.
    delta_base: Option<Vec<u8>>,
}

impl Subscriber {
    fn new(protocol: &Protocol) -> Subscriber {
        Subscriber {
            protocol: protocol.clone(),
            frames: FrameReader::default(),
            awaiting: 0,
            tracker: SeqTracker::new(),
            ready: false,
            outgoing: Vec::new(),
            closing: false,
            delta_base: matches!(protocol, Protocol::Native { delta: true, .. }).then(Vec::new),
        }
    }

    /// Takes in bytes read at `now` (nanoseconds since the run's start); `Err` with the reason
    /// when the server closed or sent something unreadable.
    fn on_bytes(&mut self, bytes: &[u8], now: u64, batch: &mut Batch) -> Result<Status, String> {
        let mut ended: Option<Result<Status, String>> = None;
        let Subscriber {
            protocol,
            frames,
            awaiting,
            tracker,
            ready,
            outgoing,
            closing,
            delta_base,
        } = self;
        let format = match &*protocol {
            Protocol::Native { format, .. } => Some(*format),
            Protocol::Raw => None,
        };
        let fed = frames.feed(bytes, |frame| {
            if ended.is_some() {
                return;
            }
            match frame {
                Frame::Close(code, reason) => {
                    ended = Some(if *closing {
                        Ok(Status::Finished)
                    } else {
                        // Answer as a client does, then go.
                        if code == 1005 {
                            wsframe::push_masked(outgoing, wsframe::CLOSE, &[]);
                        } else {
                            wsframe::push_close(outgoing, code);
                        }
                        Err(OpenError::Closed(code, reason).reason())
                    });
                }
                _ if *closing => {}
                Frame::Ping(payload) => wsframe::push_masked(outgoing, wsframe::PONG, payload),
                Frame::Pong => {}
                Frame::Binary(_) if format != Some(Format::Protobuf) => {}
                Frame::Text(_) if format == Some(Format::Protobuf) => {}
                Frame::Text(_) | Frame::Binary(_) if *awaiting > 0 => {
                    let data = match frame {
                        Frame::Text(text) => text.as_bytes(),
                        Frame::Binary(data) => data,
                        _ => &[],
                    };
                    let delta = delta_base.is_some();
                    match native_hello_replies(format.unwrap_or(Format::Json), data, delta) {
                        Ok((answered, ping)) => {
                            if ping {
                                pong(format, outgoing);
                            }
                            *awaiting = awaiting.saturating_sub(answered);
                        }
                        Err(error) => ended = Some(Err(error.reason())),
                    }
                }
                Frame::Text(_) | Frame::Binary(_) => match match frame {
                    Frame::Text(text) if delta_base.is_some() => {
                        interpret_native(Format::Json, text.as_bytes(), delta_base.as_mut())
                    }
                    Frame::Binary(data) if delta_base.is_some() => {
                        interpret_native(Format::Protobuf, data, delta_base.as_mut())
                    }
                    Frame::Text(text) => interpret_text(protocol, text),
                    Frame::Binary(data) => interpret_binary(protocol, data),
                    _ => Received::Other,
                } {
                    Received::Stamps { stamps, ping } => {
                        if ping {
                            pong(format, outgoing);
                        }
                        if !*ready {
                            *ready = true;
                            batch.ready += 1;
                        }
                        for stamp in stamps.into_iter().filter(|stamp| stamp.seq != PROBE) {
                            batch.latencies.push(now.saturating_sub(stamp.t));
                            tracker.observe(stamp.seq);
                            batch.deliveries += 1;
                            batch.last_delivery = now;
                        }
                    }
                    Received::Ping => pong(format, outgoing),
                    Received::Other | Received::Closed(..) => {}
                },
            }
        });
        match (fed, ended) {
            (_, Some(ended)) => ended,
            (Err(error), None) => Err(format!("protocol: {error}")),
            (Ok(()), None) => Ok(Status::Open),
        }
    }
}

/// Answers a server ping in the connection's format.
fn pong(format: Option<Format>, outgoing: &mut Vec<u8>) {
    match format {
        Some(Format::Protobuf) => {
            wsframe::push_masked(outgoing, BINARY, Format::Protobuf.client_pong())
        }
        _ => wsframe::push_text(outgoing, "{}"),
    }
}

/// A subscriber in the reader thread.
struct Slot {
    stream: TcpStream,
    state: Subscriber,
}

enum Command {
    Add(Box<Opened>),
    /// Close every subscriber, wait for the servers' close frames (a while), and return.
    Stop,
}

/// The thread that reads every subscriber.
pub struct Readers {
    commands: mpsc::Sender<Command>,
    waker: Arc<Waker>,
    thread: Option<JoinHandle<Vec<SeqTracker>>>,
}

impl Readers {
    pub fn start(shared: Arc<Shared>) -> io::Result<Readers> {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKE)?);
        let (commands, received) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("fanout-reader".into())
            .spawn(move || run(poll, received, &shared))?;
        Ok(Readers {
            commands,
            waker,
            thread: Some(thread),
        })
    }

    /// Hands an opened subscriber to the thread. An error means the thread has ended.
    pub fn add(&self, opened: Opened) -> Result<(), String> {
        self.send(Command::Add(Box::new(opened)))
    }

    fn send(&self, command: Command) -> Result<(), String> {
        self.commands
            .send(command)
            .map_err(|_| "the reader thread has ended".to_owned())?;
        self.waker.wake().map_err(|error| io_reason(&error))
    }

    /// Closes every subscriber and returns what each saw.
    pub async fn finish(mut self) -> Vec<SeqTracker> {
        let _ = self.send(Command::Stop);
        let Some(thread) = self.thread.take() else {
            return Vec::new();
        };
        tokio::task::spawn_blocking(move || thread.join().unwrap_or_default())
            .await
            .unwrap_or_default()
    }
}

impl Drop for Readers {
    /// A run that is stopped early still closes its subscribers, in the background.
    fn drop(&mut self) {
        if self.thread.is_some() {
            let _ = self.send(Command::Stop);
        }
    }
}

/// The reader thread's loop; returns every subscriber's tracker.
fn run(mut poll: Poll, commands: mpsc::Receiver<Command>, shared: &Shared) -> Vec<SeqTracker> {
    let mut events = Events::with_capacity(1024);
    let mut slots: Vec<Option<Slot>> = Vec::new();
    let mut trackers = Vec::new();
    let mut buffer = vec![0u8; READ_BUFFER];
    let mut histogram: Histogram<u64> = Latencies::histogram();
    let mut batch = Batch::default();
    let mut open = 0usize;
    let mut stop_by: Option<Instant> = None;
    let mut last_event = Instant::now();
    let mut napping = false;
    loop {
        let timeout = if last_event.elapsed() < NAP_WINDOW {
            if napping {
                std::thread::sleep(NAP);
            }
            Some(Duration::ZERO)
        } else {
            stop_by.map(|by| by.saturating_duration_since(Instant::now()))
        };
        if let Err(error) = poll.poll(&mut events, timeout) {
            if error.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            shared
                .failures
                .add(format!("reader thread: poll failed: {}", io_reason(&error)));
            break;
        }
        // Nothing ready: nap before the next poll (within the window).
        napping = events.is_empty();
        if !events.is_empty() {
            last_event = Instant::now();
        }
        for event in &events {
            if event.token() == WAKE {
                while let Ok(command) = commands.try_recv() {
                    match command {
                        Command::Add(opened) => {
                            let Opened {
                                stream,
                                mut state,
                                leftover,
                            } = *opened;
                            let token = Token(slots.len());
                            let registered = stream.into_std().and_then(|stream| {
                                let mut stream = TcpStream::from_std(stream);
                                poll.registry().register(
                                    &mut stream,
                                    token,
                                    Interest::READABLE | Interest::WRITABLE,
                                )?;
                                Ok(stream)
                            });
                            let stream = match registered {
                                Ok(stream) => stream,
                                Err(error) => {
                                    drop_subscriber(shared, &io_reason(&error));
                                    trackers.push(state.tracker);
                                    continue;
                                }
                            };
                            if stop_by.is_some() {
                                // Too late to measure: close it like the others.
                                state.closing = true;
                                wsframe::push_close(&mut state.outgoing, 1000);
                            }
                            let mut slot = Slot { stream, state };
                            let status = if leftover.is_empty() {
                                Ok(Status::Open)
                            } else {
                                slot.state.on_bytes(&leftover, shared.now(), &mut batch)
                            };
                            slots.push(Some(slot));
                            open += 1;
                            if let Some(ended) = settle(&mut slots[token.0], status) {
                                end(shared, &mut trackers, &mut slots[token.0], ended);
                                open -= 1;
                            }
                        }
                        Command::Stop if stop_by.is_none() => {
                            stop_by = Some(Instant::now() + CLOSE_WAIT);
                            for slot in &mut slots {
                                let Some(live) = slot else {
                                    continue;
                                };
                                live.state.closing = true;
                                wsframe::push_close(&mut live.state.outgoing, 1000);
                                if let Some(ended) = settle(slot, Ok(Status::Open)) {
                                    end(shared, &mut trackers, slot, ended);
                                    open -= 1;
                                }
                            }
                        }
                        Command::Stop => {}
                    }
                }
                continue;
            }
            let index = event.token().0;
            let Some(Some(slot)) = slots.get_mut(index) else {
                continue;
            };
            let status = read_all(slot, &mut buffer, shared, &mut batch);
            if let Some(ended) = settle(&mut slots[index], status) {
                end(shared, &mut trackers, &mut slots[index], ended);
                open -= 1;
            }
        }
        if batch.deliveries > 0 || batch.ready > 0 {
            for nanos in batch.latencies.drain(..) {
                Latencies::record_in(&mut histogram, nanos);
            }
            shared.deliveries.fetch_add(batch.deliveries, Relaxed);
            shared.ready.fetch_add(batch.ready, Relaxed);
            shared.last_delivery.fetch_max(batch.last_delivery, Relaxed);
            batch.deliveries = 0;
            batch.ready = 0;
        }
        if let Some(by) = stop_by {
            if open == 0 || Instant::now() >= by {
                break;
            }
        }
    }
    // Those that did not answer our close in time (or all of them, if polling failed).
    trackers.extend(slots.into_iter().flatten().map(|slot| slot.state.tracker));
    shared.latencies.add(&histogram);
    trackers
}

/// How a subscriber ended.
enum Ended {
    /// Our close was answered (or the socket closed after it): not a drop.
    Closed,
    Dropped(String),
}

/// Writes what the subscriber has to send, and says whether it has ended.
fn settle(slot: &mut Option<Slot>, status: Result<Status, String>) -> Option<Ended> {
    let slot = slot.as_mut()?;
    let flushed = flush(slot);
    let closing = slot.state.closing;
    match (status, flushed) {
        (Ok(Status::Finished), _) => Some(Ended::Closed),
        (Err(_), _) if closing => Some(Ended::Closed),
        (Err(reason), _) => Some(Ended::Dropped(reason)),
        (Ok(Status::Open), Err(_)) if closing => Some(Ended::Closed),
        (Ok(Status::Open), Err(reason)) => Some(Ended::Dropped(reason)),
        (Ok(Status::Open), Ok(())) => None,
    }
}

fn end(shared: &Shared, trackers: &mut Vec<SeqTracker>, slot: &mut Option<Slot>, ended: Ended) {
    let Some(slot) = slot.take() else {
        return;
    };
    if let Ended::Dropped(reason) = ended {
        drop_subscriber(shared, &reason);
    }
    trackers.push(slot.state.tracker);
    // Dropping the stream deregisters and closes it.
}

fn drop_subscriber(shared: &Shared, reason: &str) {
    shared.dropped.fetch_add(1, Relaxed);
    shared.failures.add(format!("dropped: {reason}"));
}

/// Reads until the socket is drained (a read shorter than the buffer, or `WouldBlock`).
fn read_all(
    slot: &mut Slot,
    buffer: &mut [u8],
    shared: &Shared,
    batch: &mut Batch,
) -> Result<Status, String> {
    loop {
        match slot.stream.read(buffer) {
            Ok(0) if slot.state.closing => return Ok(Status::Finished),
            Ok(0) => return Err("connection closed".into()),
            Ok(n) => {
                let now = shared.now();
                let status = slot.state.on_bytes(&buffer[..n], now, batch)?;
                if status == Status::Finished || n < buffer.len() {
                    return Ok(status);
                }
            }
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => return Ok(Status::Open),
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(io_reason(&error)),
        }
    }
}

/// Writes as much of the outgoing frames as the socket takes; the rest waits for a writable
/// event.
fn flush(slot: &mut Slot) -> Result<(), String> {
    let outgoing = &mut slot.state.outgoing;
    let mut written = 0;
    let result = loop {
        if written == outgoing.len() {
            break Ok(());
        }
        match slot.stream.write(&outgoing[written..]) {
            Ok(0) => break Err("connection closed".into()),
            Ok(n) => written += n,
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => break Ok(()),
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => break Err(io_reason(&error)),
        }
    };
    outgoing.drain(..written);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_of_16_bytes() {
        assert_eq!(base64_16(&[0; 16]), "AAAAAAAAAAAAAAAAAAAAAA==");
        // RFC 6455 §4.1's example nonce.
        assert_eq!(base64_16(b"the sample nonce"), "dGhlIHNhbXBsZSBub25jZQ==");
        assert_eq!(upgrade_key().len(), 24);
    }

    fn server_text(text: &str) -> Vec<u8> {
        let mut out = vec![0x81, text.len() as u8];
        out.extend_from_slice(text.as_bytes());
        out
    }

    #[test]
    fn a_subscriber_records_stamps_answers_pings_and_reports_a_close() {
        let mut subscriber = Subscriber::new(&Protocol::Raw);
        let mut batch = Batch::default();
        let mut bytes = server_text(r#"{"seq":0,"t":1,"pad":""}"#);
        bytes.extend(server_text(r#"{"seq":1,"t":100,"pad":""}"#));
        bytes.extend([0x89, 1, b'p']);
        let (first, second) = bytes.split_at(30);
        assert_eq!(
            subscriber.on_bytes(first, 400, &mut batch),
            Ok(Status::Open)
        );
        assert_eq!(
            subscriber.on_bytes(second, 500, &mut batch),
            Ok(Status::Open)
        );
        assert_eq!(batch.ready, 1);
        assert_eq!(batch.deliveries, 1);
        assert_eq!(batch.latencies, [400]);
        assert_eq!(subscriber.tracker.received(), 1);
        // A masked pong with the ping's payload.
        assert_eq!(&subscriber.outgoing[..2], &[0x8A, 0x81]);
        subscriber.outgoing.clear();
        let close = [0x88, 6, 0x0B, 0xC0, b's', b'l', b'o', b'w'];
        assert_eq!(
            subscriber.on_bytes(&close, 600, &mut batch),
            Err("closed 3008 slow".into())
        );
        assert_eq!(
            &subscriber.outgoing[..2],
            &[0x88, 0x82],
            "the close answered"
        );
    }

    #[test]
    fn a_bad_frame_is_a_reason_not_a_panic() {
        let mut subscriber = Subscriber::new(&Protocol::Raw);
        let mut batch = Batch::default();
        assert_eq!(
            subscriber.on_bytes(&[0x83, 0], 1, &mut batch),
            Err("protocol: unknown opcode 0x3".into())
        );
    }

    #[test]
    fn native_replies_then_pushes_in_one_read() {
        let native = Protocol::Native {
            token: String::new(),
            channel: Some("chat:x".into()),
            tags_filter: None,
            format: Format::Json,
            delta: false,
        };
        let mut subscriber = Subscriber::new(&native);
        subscriber.awaiting = 2;
        let mut batch = Batch::default();
        let mut bytes = server_text("{\"id\":1,\"connect\":{}}\n{\"id\":2,\"subscribe\":{}}");
        bytes.extend(server_text("{}"));
        bytes.extend(server_text(
            r#"{"push":{"channel":"chat:x","pub":{"data":{"seq":1,"t":5}}}}"#,
        ));
        assert_eq!(subscriber.on_bytes(&bytes, 9, &mut batch), Ok(Status::Open));
        assert_eq!(subscriber.awaiting, 0);
        assert_eq!(batch.deliveries, 1);
        assert_eq!(batch.latencies, [4]);
        assert_eq!(
            &subscriber.outgoing[..2],
            &[0x81, 0x82],
            "the ping answered"
        );
        let refused = server_text(r#"{"id":1,"error":{"code":109,"message":"token expired"}}"#);
        let mut refused_subscriber = Subscriber::new(&native);
        refused_subscriber.awaiting = 2;
        assert_eq!(
            refused_subscriber.on_bytes(&refused, 1, &mut batch),
            Err("connect error 109: token expired".into())
        );
    }

    /// With delta compression: a whole publication (its JSON in a JSON string), then a delta
    /// from it, rebuilt and counted; a delta that does not apply is not counted.
    #[test]
    fn a_delta_subscriber_rebuilds_each_publication() {
        let native = Protocol::Native {
            token: String::new(),
            channel: Some("chat:x".into()),
            tags_filter: None,
            format: Format::Json,
            delta: true,
        };
        let mut subscriber = Subscriber::new(&native);
        let mut batch = Batch::default();
        let first = crate::seq::stamp_message(1, 5, 64);
        let second = crate::seq::stamp_message(2, 6, 64);
        let delta = plexus_protocol::fossil::create_text(&first, &second);
        let push = |data: &str, delta: bool| {
            let publication = if delta {
                serde_json::json!({"data": data, "delta": true})
            } else {
                serde_json::json!({"data": data})
            };
            server_text(
                &serde_json::json!({"push": {"channel": "chat:x", "pub": publication}}).to_string(),
            )
        };
        let mut bytes = push(&first, false);
        bytes.extend(push(&delta, true));
        assert_eq!(subscriber.on_bytes(&bytes, 9, &mut batch), Ok(Status::Open));
        assert_eq!(batch.deliveries, 2);
        assert_eq!(batch.latencies, [4, 3]);
        // A delta from another base does not apply: not counted.
        let other = crate::seq::stamp_message(3, 7, 20);
        let mut bytes = push(&other, false);
        bytes.extend(push(&delta, true));
        assert_eq!(
            subscriber.on_bytes(&bytes, 10, &mut batch),
            Ok(Status::Open)
        );
        assert_eq!(batch.deliveries, 3);
    }

    /// The same in Protobuf: binary messages, a ping answered with the empty command (one 0
    /// byte in a binary frame), and text ignored.
    #[test]
    fn protobuf_replies_then_pushes() {
        use plexus_protocol::client::{
            ConnectResult, Payload, Publication, PushBody, Reply, ReplyBody, SubscribeResult,
        };
        let native = Protocol::Native {
            token: String::new(),
            channel: Some("chat:x".into()),
            tags_filter: None,
            format: Format::Protobuf,
            delta: false,
        };
        let binary = |data: &[u8]| {
            let mut out = vec![0x82, data.len() as u8];
            out.extend_from_slice(data);
            out
        };
        let reply = |id, body| Reply {
            id,
            error: None,
            body: Some(body),
        };
        let hello = Format::Protobuf.join_batch([
            Format::Protobuf.encode_reply(&reply(1, ReplyBody::Connect(ConnectResult::default()))),
            Format::Protobuf
                .encode_reply(&reply(2, ReplyBody::Subscribe(SubscribeResult::default()))),
        ]);
        let publication = Publication {
            data: Some(Payload::new(&br#"{"seq":1,"t":5}"#[..])),
            ..Publication::default()
        };
        let push = Format::Protobuf.encode_push("chat:x", &PushBody::Publication(publication));
        let mut subscriber = Subscriber::new(&native);
        subscriber.awaiting = 2;
        let mut batch = Batch::default();
        let mut bytes = binary(&hello);
        bytes.extend(binary(Format::Protobuf.server_ping()));
        bytes.extend(server_text(
            r#"{"push":{"channel":"chat:x","pub":{"data":{"seq":2,"t":5}}}}"#,
        ));
        bytes.extend(binary(&push));
        assert_eq!(subscriber.on_bytes(&bytes, 9, &mut batch), Ok(Status::Open));
        assert_eq!(subscriber.awaiting, 0);
        assert_eq!(batch.deliveries, 1, "the binary push only");
        assert_eq!(batch.latencies, [4]);
        assert_eq!(
            &subscriber.outgoing[..2],
            &[0x82, 0x81],
            "the ping answered in binary"
        );
    }

    /// A server that answers the upgrade and then follows `script` on the socket.
    async fn scripted_server<F, Fut>(script: F) -> (Endpoint, tokio::task::JoinHandle<()>)
    where
        F: FnOnce(tokio::net::TcpStream, Vec<u8>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let endpoint = Endpoint {
            target: crate::Target::websocket(&format!("ws://{addr}/chat/x")).unwrap(),
            addr,
            protocol: Protocol::Raw,
            sources: None,
            timeout: Duration::from_secs(5),
            recv_buffer: None,
        };
        let server = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut request = Vec::new();
            while !request.windows(4).any(|window| window == b"\r\n\r\n") {
                assert_ne!(socket.read_buf(&mut request).await.unwrap(), 0);
            }
            let request = String::from_utf8(request).unwrap();
            assert!(request.starts_with("GET /chat/x HTTP/1.1\r\n"), "{request}");
            let key = request
                .lines()
                .find_map(|line| line.strip_prefix("Sec-WebSocket-Key: "))
                .unwrap();
            let accept = plexus_protocol::ws::handshake::accept_key(key.trim());
            let response = format!(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
                 Connection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
            );
            script(socket, response.into_bytes()).await;
        });
        (endpoint, server)
    }

    /// Reads one masked client frame: its first byte and unmasked payload.
    async fn client_frame(socket: &mut tokio::net::TcpStream) -> (u8, Vec<u8>) {
        let mut header = [0u8; 6];
        socket.read_exact(&mut header).await.unwrap();
        assert_ne!(header[1] & 0x80, 0, "client frames are masked");
        let len = usize::from(header[1] & 0x7F);
        assert!(len <= 125);
        let mut payload = vec![0u8; len];
        socket.read_exact(&mut payload).await.unwrap();
        for (i, byte) in payload.iter_mut().enumerate() {
            *byte ^= header[2 + i % 4];
        }
        (header[0], payload)
    }

    async fn wait_for(what: impl Fn() -> bool) {
        let until = Instant::now() + Duration::from_secs(5);
        while !what() {
            assert!(Instant::now() < until, "timed out");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// A reader thread with one subscriber of `endpoint` opened and added.
    async fn one_subscriber(endpoint: &Endpoint) -> (Arc<Shared>, Readers) {
        let shared = Arc::new(Shared::new());
        let readers = Readers::start(shared.clone()).unwrap();
        readers
            .add(open(endpoint, 0, &shared).await.unwrap())
            .unwrap();
        (shared, readers)
    }

    #[tokio::test]
    async fn the_reader_thread_reads_answers_and_closes() {
        let (endpoint, server) = scripted_server(|mut socket, mut out| async move {
            // A probe in the same write as the upgrade response: it must not be lost.
            out.extend(server_text(r#"{"seq":0,"t":0,"pad":""}"#));
            socket.write_all(&out).await.unwrap();
            // A measured message in two fragments, a ping between them, cut across writes.
            let message = br#"{"seq":1,"t":0,"pad":""}"#;
            let (head, tail) = message.split_at(10);
            let mut bytes = vec![0x01, head.len() as u8];
            bytes.extend_from_slice(head);
            bytes.extend([0x89, 2, b'h', b'i']);
            bytes.extend([0x80, tail.len() as u8]);
            bytes.extend_from_slice(tail);
            let (first, second) = bytes.split_at(15);
            socket.write_all(first).await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
            socket.write_all(second).await.unwrap();
            assert_eq!(client_frame(&mut socket).await, (0x8A, b"hi".to_vec()));
            // The end of the run: the client's close, answered.
            assert_eq!(client_frame(&mut socket).await, (0x88, vec![0x03, 0xE8]));
            socket.write_all(&[0x88, 2, 0x03, 0xE8]).await.unwrap();
        })
        .await;
        let (shared, readers) = one_subscriber(&endpoint).await;
        wait_for(|| shared.deliveries.load(Relaxed) == 1).await;
        assert_eq!(shared.ready.load(Relaxed), 1);
        let trackers = readers.finish().await;
        server.await.unwrap();
        assert_eq!(trackers.len(), 1);
        assert_eq!(trackers[0].finish(1).received, 1);
        assert_eq!(shared.dropped.load(Relaxed), 0);
        assert!(shared.failures.snapshot().is_empty());
        assert_eq!(shared.latencies.summary().count, 1);
    }

    #[tokio::test]
    async fn a_malformed_frame_drops_the_subscriber_with_its_reason() {
        let (endpoint, server) = scripted_server(|mut socket, mut out| async move {
            out.extend([0x83, 0]);
            socket.write_all(&out).await.unwrap();
            // The client goes away.
            let mut rest = Vec::new();
            let _ = socket.read_to_end(&mut rest).await;
        })
        .await;
        let (shared, readers) = one_subscriber(&endpoint).await;
        wait_for(|| shared.dropped.load(Relaxed) == 1).await;
        assert_eq!(readers.finish().await.len(), 1);
        server.await.unwrap();
        assert_eq!(
            shared.failures.snapshot().into_iter().collect::<Vec<_>>(),
            [("dropped: protocol: unknown opcode 0x3".to_owned(), 1)]
        );
    }

    #[tokio::test]
    async fn a_refused_upgrade_is_its_status() {
        let (endpoint, server) = scripted_server(|mut socket, _| async move {
            socket
                .write_all(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n")
                .await
                .unwrap();
        })
        .await;
        let shared = Shared::new();
        let error = open(&endpoint, 0, &shared).await.err().unwrap();
        assert_eq!(error.reason(), "HTTP 503");
        server.await.unwrap();
    }
}
