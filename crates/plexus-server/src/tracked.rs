//! A socket that carries its connection-limit place with it, so the place is held exactly as
//! long as the socket lives, through TLS and WebSocket upgrades alike; and that fails a write
//! which makes no progress for `write_timeout` (a peer that stopped reading), so no connection
//! holds its place, its buffers or a shutdown forever.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll};

use std::future::Future;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

use crate::limits::ConnectionGuard;

#[derive(Debug)]
pub struct Tracked<IO> {
    io: IO,
    _guard: ConnectionGuard,
    write_timeout: Duration,
    /// Started when a write is pending; allocated only then.
    stalled_since: Option<Pin<Box<Sleep>>>,
}

impl<IO> Tracked<IO> {
    pub fn new(io: IO, guard: ConnectionGuard, write_timeout: Duration) -> Tracked<IO> {
        Tracked {
            io,
            _guard: guard,
            write_timeout,
            stalled_since: None,
        }
    }

    /// The same place and timeout around another I/O object made from this one.
    pub fn map_io<T>(self, f: impl FnOnce(IO) -> T) -> Tracked<T> {
        Tracked {
            io: f(self.io),
            _guard: self._guard,
            write_timeout: self.write_timeout,
            stalled_since: None,
        }
    }

    /// Turns a pending write into a timeout error once it has been pending for too long.
    fn watch<T>(&mut self, cx: &mut Context<'_>, poll: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        match poll {
            Poll::Ready(result) => {
                self.stalled_since = None;
                Poll::Ready(result)
            }
            Poll::Pending => {
                let timeout = self.write_timeout;
                let timer = self
                    .stalled_since
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                if timer.as_mut().poll(cx).is_ready() {
                    self.stalled_since = None;
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "write made no progress within write_timeout",
                    )));
                }
                Poll::Pending
            }
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Tracked<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Tracked<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.io).poll_write(cx, buf);
        self.watch(cx, poll)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.watch(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.io).poll_flush(cx);
        self.watch(cx, poll)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
