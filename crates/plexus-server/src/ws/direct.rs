//! Direct writes: deliveries to idle WebSocket connections go out from a flusher, not from each
//! connection's task.
//!
//! A connection over plain TCP shares its socket ([`SharedTcp`]) with a [`SocketWriter`] set on
//! its outbox. When its task has nothing to write it parks the outbox
//! ([`plexus_core::Outbox::park`]); a delivery to a parked outbox puts it on one of the server's
//! flush [`Lanes`] instead of waking the task. Each lane's flusher writes every scheduled
//! connection's frames with one `write`/`writev` each — no task wake-up, no `epoll` round per
//! delivery, which is what a fan-out to thousands of idle subscribers is made of.
//!
//! Under load the flusher coalesces: when more deliveries arrived during a round that took a
//! while, it waits as long again before the next, so publications that arrive meanwhile reach
//! each subscriber in one system call. At low rates nothing is pending after a round and
//! nothing waits.
//!
//! What the writer cannot finish at once (a full socket, a partly written frame, a delivery
//! only the task handles, like a close) goes back to the task, which writes it first.

use std::collections::VecDeque;
use std::io::{self, IoSlice, Read, Write};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use plexus_core::{Control, Delivery, DirectWriter, Outbox};
use plexus_protocol::client::Format;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::native::encode;
use crate::Shared;

/// Most frames handed to one `writev`.
const MAX_SLICES: usize = 64;
/// Connections flushed between two yields to the runtime.
const YIELD_EVERY: usize = 128;
/// A round shorter than this is followed by the next at once; a longer one, if more is already
/// pending, by a pause as long as itself (at most [`MAX_PAUSE`]), to let publications gather.
const PACE_FROM: Duration = Duration::from_millis(1);
const MAX_PAUSE: Duration = Duration::from_millis(10);

/// A TCP socket shared by its connection's task (reads, and writes while unparked) and its
/// [`SocketWriter`] (writes while parked). The outbox's park/unpark handshake keeps the two
/// writers from ever writing at the same time.
#[derive(Debug, Clone)]
pub(crate) struct SharedTcp(pub(crate) Arc<TcpStream>);

impl AsyncRead for SharedTcp {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let socket = &*self.0;
        loop {
            ready!(socket.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            let want = unfilled.len();
            let mut got = 0;
            // A short read drains the socket (edge-triggered readiness): report it as
            // `WouldBlock` to `try_io` so readiness is cleared now, instead of paying for one more
            // `read` that returns EAGAIN next time.
            let result = socket.try_io(Interest::READABLE, || {
                let n = (&*socket2::SockRef::from(socket)).read(unfilled)?;
                got = n;
                if n > 0 && n < want {
                    Err(io::ErrorKind::WouldBlock.into())
                } else {
                    Ok(n)
                }
            });
            match result {
                Ok(n) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock && got > 0 => {
                    buf.advance(got);
                    return Poll::Ready(Ok(()));
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => continue,
                Err(error) => return Poll::Ready(Err(error)),
            }
        }
    }
}

impl AsyncWrite for SharedTcp {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.0.poll_write_ready(cx))?;
            match self.0.try_write_vectored(bufs) {
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => continue,
                result => return Poll::Ready(result),
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(socket2::SockRef::from(&*self.0).shutdown(std::net::Shutdown::Write))
    }
}

/// One flusher's queue of parked outboxes with something to write.
#[derive(Debug, Default)]
pub(crate) struct Lane {
    pending: Mutex<Pending>,
    notify: Notify,
}

#[derive(Debug, Default)]
struct Pending {
    outboxes: Vec<Arc<Outbox>>,
    /// The flusher has stopped (shutdown): outboxes go straight back to their tasks.
    closed: bool,
}

impl Lane {
    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        super::lock(&self.pending)
    }

    fn schedule(&self, outbox: Arc<Outbox>) {
        let mut pending = self.lock();
        if pending.closed {
            drop(pending);
            outbox.unpark_and_wake();
            return;
        }
        let was_empty = pending.outboxes.is_empty();
        pending.outboxes.push(outbox);
        drop(pending);
        if was_empty {
            self.notify.notify_one();
        }
    }

    fn has_pending(&self) -> bool {
        !self.lock().outboxes.is_empty()
    }

    fn take(&self, into: &mut Vec<Arc<Outbox>>) {
        std::mem::swap(into, &mut self.lock().outboxes);
    }

    /// Stops the lane: what is scheduled, and whatever is scheduled later, goes back to its
    /// connection's task.
    fn close(&self) {
        let mut pending = self.lock();
        pending.closed = true;
        let left = std::mem::take(&mut pending.outboxes);
        drop(pending);
        for outbox in left {
            outbox.unpark_and_wake();
        }
    }
}

/// The server's flush lanes: one per runtime worker, connections dealt to them in turn.
#[derive(Debug)]
pub(crate) struct Lanes {
    lanes: Box<[Arc<Lane>]>,
    next: AtomicUsize,
}

impl Lanes {
    pub(crate) fn new(n: usize) -> Lanes {
        Lanes {
            lanes: (0..n.max(1)).map(|_| Arc::default()).collect(),
            next: AtomicUsize::new(0),
        }
    }

    fn pick(&self) -> Arc<Lane> {
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        self.lanes[i % self.lanes.len()].clone()
    }
}

/// Starts one flusher per lane; they stop at shutdown.
pub(crate) fn start(shared: &Arc<Shared>) {
    for lane in shared.direct.lanes.iter() {
        let lane = lane.clone();
        let shutdown = shared.shutdown.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = flush_forever(&lane) => {}
                () = shutdown.cancelled() => {}
            }
            lane.close();
        });
    }
}

async fn flush_forever(lane: &Lane) {
    let mut batch = Vec::new();
    loop {
        lane.notify.notified().await;
        loop {
            lane.take(&mut batch);
            if batch.is_empty() {
                break;
            }
            let started = Instant::now();
            for (i, outbox) in batch.drain(..).enumerate() {
                outbox.flush_parked();
                if i % YIELD_EVERY == YIELD_EVERY - 1 {
                    tokio::task::yield_now().await;
                }
            }
            // More arrived while this round ran: deliveries come faster than one write each can
            // keep up with, so let them gather for as long again and send them together.
            let spent = started.elapsed();
            if spent >= PACE_FROM && lane.has_pending() {
                tokio::time::sleep(spent.min(MAX_PAUSE)).await;
            }
        }
    }
}

/// What a connection's deliveries become on the wire.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Frames {
    /// Raw rooms: each publication's data as one frame; joins and leaves are not sent.
    Raw,
    /// The native protocol: `pub`, `join` and `leave` pushes, as JSON text frames or Protobuf
    /// binary ones.
    Native(Format),
}

/// Writes a parked connection's deliveries straight to its socket (see the module docs).
pub(crate) struct SocketWriter {
    socket: Arc<TcpStream>,
    lane: Arc<Lane>,
    shared: Arc<Shared>,
    frames: Frames,
    deflate: bool,
}

/// What one queued delivery means to the writer.
enum Step<'a> {
    /// Its frame, borrowed from the delivery (encoded once per publication) or a static.
    Frame(&'a Bytes),
    /// Nothing to send (a join or leave a raw client does not get).
    Skip,
    /// Only the connection's task can handle it.
    Stop,
}

impl SocketWriter {
    pub(crate) fn new(
        shared: &Arc<Shared>,
        socket: Arc<TcpStream>,
        frames: Frames,
        deflate: bool,
    ) -> Arc<SocketWriter> {
        Arc::new(SocketWriter {
            socket,
            lane: shared.direct.pick(),
            shared: shared.clone(),
            frames,
            deflate,
        })
    }

    fn step<'a>(&self, delivery: &'a Delivery) -> Step<'a> {
        match (self.frames, delivery) {
            (_, Delivery::Control(Control::Frame(frame) | Control::Rest(frame))) => {
                Step::Frame(frame)
            }
            (frames, Delivery::Control(Control::Heartbeat)) => {
                Step::Frame(super::connection::heartbeat_frame(frames))
            }
            (_, Delivery::Control(_)) => Step::Stop,
            (
                Frames::Raw,
                Delivery::Publication(publication) | Delivery::Chained { publication, .. },
            ) => Step::Frame(super::raw::publication_frame(publication, self.deflate)),
            (Frames::Raw, Delivery::Join(_) | Delivery::Leave(_)) => Step::Skip,
            (Frames::Native(format), Delivery::Publication(publication)) => {
                Step::Frame(encode::publication_frame(publication, format, self.deflate))
            }
            // A delta subscriber's: the hub chained it to the one before, which the client
            // holds. (The connection parks only once its subscriptions are settled, and with
            // nothing queued: no delivery of an earlier subscription's chain is left.)
            (
                Frames::Native(format),
                Delivery::Chained {
                    publication,
                    previous,
                    ..
                },
            ) => Step::Frame(encode::delta_frame(
                publication,
                previous.as_deref(),
                format,
                self.deflate,
            )),
            (Frames::Native(format), Delivery::Join(membership)) => Step::Frame(
                encode::membership_frame(membership, true, format, self.deflate),
            ),
            (Frames::Native(format), Delivery::Leave(membership)) => Step::Frame(
                encode::membership_frame(membership, false, format, self.deflate),
            ),
        }
    }
}

impl DirectWriter for SocketWriter {
    fn schedule(&self, outbox: Arc<Outbox>) {
        self.lane.schedule(outbox);
    }

    fn write(&self, items: &mut VecDeque<Delivery>) -> bool {
        let metrics = &self.shared.metrics.websocket;
        loop {
            // The frames of up to MAX_SLICES items, borrowed (no copy, no reference count, no
            // allocation), and each item's frame length (0: nothing to send).
            let mut slices = [IoSlice::new(&[]); MAX_SLICES];
            let mut lens = [0usize; MAX_SLICES];
            let (mut looked, mut n, mut total, mut stopped) = (0, 0, 0, false);
            for item in items.iter().take(MAX_SLICES) {
                match self.step(item) {
                    Step::Frame(frame) => {
                        slices[n] = IoSlice::new(frame);
                        n += 1;
                        lens[looked] = frame.len();
                        total += frame.len();
                    }
                    Step::Skip => {}
                    Step::Stop => {
                        stopped = true;
                        break;
                    }
                }
                looked += 1;
            }
            // Straight to the socket, without tokio's readiness: a full socket (EAGAIN) sends the
            // rest to the task, whose own write then clears the readiness and waits. An error is
            // left for the task's write to report.
            let written = if n == 0 {
                0
            } else {
                (&*socket2::SockRef::from(&*self.socket))
                    .write_vectored(&slices[..n])
                    .unwrap_or_default()
            };
            metrics.bytes_out.inc_by(written as u64);
            // What went out whole leaves the queue; a frame cut short stays at the front as the
            // rest of a frame begun (never dropped); the others stay as they were.
            let mut left = written;
            let mut sent = 0u64;
            for &len in &lens[..looked] {
                if left < len {
                    if left > 0 {
                        let rest = match self.step(&items[0]) {
                            Step::Frame(frame) => Some(frame.slice(left..)),
                            Step::Skip | Step::Stop => None,
                        };
                        if let Some(rest) = rest {
                            items[0] = Delivery::Control(Control::Rest(rest));
                        }
                    }
                    break;
                }
                left -= len;
                sent += u64::from(len > 0);
                items.pop_front();
            }
            metrics.messages_out.inc_by(sent);
            if written < total || stopped {
                return false;
            }
            if items.is_empty() {
                return true;
            }
        }
    }
}
