//! One socket driven by one task: reads handed to a parser, writes queued as shared frames.
//!
//! A connection task `select!`s over [`Wire::poll_io`], its outbox, its timers and shutdown.
//! `poll_io` writes queued frames (many per `writev`, so a burst costs one system call) and reads
//! into a buffer on the stack that lives only during the poll: a connection waiting for data
//! holds no read or write buffer of its own.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Most frames handed to one vectored write.
const MAX_SLICES: usize = 64;
/// Bytes read per poll.
const READ_CHUNK: usize = 8 * 1024;

thread_local! {
    static READ_BUFFER: std::cell::RefCell<Box<[u8]>> =
        std::cell::RefCell::new(vec![0; READ_CHUNK].into_boxed_slice());
}

/// What one [`Wire::poll_io`] did.
#[derive(Debug)]
pub enum WireEvent {
    /// This many bytes were read and handed to the reader.
    Read(usize),
    /// The peer closed its side.
    Eof,
    /// This many bytes were written.
    Wrote(usize),
    /// Everything written was flushed.
    Flushed,
    Failed(io::Error),
}

#[derive(Debug)]
pub struct Wire<IO> {
    io: IO,
    /// Frames waiting to be written; the first may be partly written already.
    frames: VecDeque<Bytes>,
    /// Bytes in `frames`.
    queued: usize,
    /// Written since the last flush (TLS keeps records until flushed).
    needs_flush: bool,
    /// The first frame in `frames` is partly written.
    front_started: bool,
}

impl<IO: AsyncRead + AsyncWrite + Unpin> Wire<IO> {
    pub fn new(io: IO) -> Wire<IO> {
        Wire {
            io,
            frames: VecDeque::new(),
            queued: 0,
            needs_flush: false,
            front_started: false,
        }
    }

    pub fn queue(&mut self, frame: Bytes) {
        self.queued += frame.len();
        self.frames.push_back(frame);
    }

    /// Queues the rest of a frame another writer began on this socket: it counts as started, so
    /// [`Wire::discard_unsent`] keeps it. The wire must be empty (the other writer wrote only
    /// while it was).
    pub fn queue_rest(&mut self, rest: Bytes) {
        debug_assert!(
            self.frames.is_empty(),
            "the rest of a frame must go out first"
        );
        self.front_started = self.frames.is_empty();
        self.queue(rest);
    }

    /// Drops queued frames that have not started to go out (a partly written one stays, so the
    /// stream remains well-formed). Used when a connection is cut for being too slow: its close
    /// frame should not wait behind data it will never read.
    pub fn discard_unsent(&mut self) {
        let keep = usize::from(self.front_started);
        while self.frames.len() > keep {
            let frame = self.frames.pop_back().expect("len checked");
            self.queued -= frame.len();
        }
    }

    /// Frees the queue's allocation if it has one and is empty (a connection about to wait idle
    /// should hold no buffer).
    pub fn release(&mut self) {
        if self.frames.is_empty() && self.frames.capacity() > 0 {
            self.frames = VecDeque::new();
        }
    }

    /// Bytes waiting to be written.
    pub fn queued(&self) -> usize {
        self.queued
    }

    /// Nothing left to write or flush.
    pub fn is_drained(&self) -> bool {
        self.frames.is_empty() && !self.needs_flush
    }

    /// Writes what is queued, then reads if `want_read`, handing bytes read to `reader`.
    /// Returns when something happened.
    pub fn poll_io(
        &mut self,
        cx: &mut Context<'_>,
        want_read: bool,
        reader: &mut impl FnMut(&[u8]),
    ) -> Poll<WireEvent> {
        if !self.frames.is_empty() {
            let mut slices = [IoSlice::new(&[]); MAX_SLICES];
            let mut n_slices = 0;
            for (slot, frame) in slices.iter_mut().zip(self.frames.iter()) {
                *slot = IoSlice::new(frame);
                n_slices += 1;
            }
            match Pin::new(&mut self.io).poll_write_vectored(cx, &slices[..n_slices]) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(WireEvent::Failed(io::ErrorKind::WriteZero.into()))
                }
                Poll::Ready(Ok(written)) => {
                    self.advance(written);
                    self.needs_flush = true;
                    return Poll::Ready(WireEvent::Wrote(written));
                }
                Poll::Ready(Err(error)) => return Poll::Ready(WireEvent::Failed(error)),
                Poll::Pending => {}
            }
        } else if self.needs_flush {
            match Pin::new(&mut self.io).poll_flush(cx) {
                Poll::Ready(Ok(())) => {
                    self.needs_flush = false;
                    return Poll::Ready(WireEvent::Flushed);
                }
                Poll::Ready(Err(error)) => return Poll::Ready(WireEvent::Failed(error)),
                Poll::Pending => {}
            }
        }
        if want_read {
            // One buffer per thread, zeroed once: a connection holds none while it waits, and a
            // read does not clear 8 KiB first. (Should the reader ever poll another wire on this
            // thread, that one reads into a buffer of its own.)
            let event = READ_BUFFER.with(|shared| match shared.try_borrow_mut() {
                Ok(mut buffer) => self.poll_read(cx, &mut buffer[..], reader),
                Err(_) => self.poll_read(cx, &mut [0u8; READ_CHUNK], reader),
            });
            if let Poll::Ready(event) = event {
                return Poll::Ready(event);
            }
        }
        Poll::Pending
    }

    fn poll_read(
        &mut self,
        cx: &mut Context<'_>,
        buffer: &mut [u8],
        reader: &mut impl FnMut(&[u8]),
    ) -> Poll<WireEvent> {
        let mut read_buf = ReadBuf::new(buffer);
        match Pin::new(&mut self.io).poll_read(cx, &mut read_buf) {
            Poll::Ready(Ok(())) if read_buf.filled().is_empty() => Poll::Ready(WireEvent::Eof),
            Poll::Ready(Ok(())) => {
                reader(read_buf.filled());
                Poll::Ready(WireEvent::Read(read_buf.filled().len()))
            }
            Poll::Ready(Err(error)) => Poll::Ready(WireEvent::Failed(error)),
            Poll::Pending => Poll::Pending,
        }
    }

    fn advance(&mut self, mut written: usize) {
        self.queued -= written;
        while written > 0 {
            let front = self.frames.front_mut().expect("wrote more than was queued");
            if written >= front.len() {
                written -= front.len();
                self.frames.pop_front();
                self.front_started = false;
            } else {
                front.advance(written);
                self.front_started = true;
                written = 0;
            }
        }
        if self.frames.is_empty() && self.frames.capacity() > 16 {
            self.frames = VecDeque::new();
        }
    }

    /// Writes everything queued and closes the write side, giving up after `timeout`.
    pub async fn finish(&mut self, timeout: std::time::Duration) {
        let _ = tokio::time::timeout(timeout, async {
            while !self.is_drained() {
                let event = std::future::poll_fn(|cx| self.poll_io(cx, false, &mut |_| {})).await;
                if matches!(event, WireEvent::Failed(_)) {
                    return;
                }
            }
            let _ = tokio::io::AsyncWriteExt::shutdown(&mut self.io).await;
        })
        .await;
    }
}
