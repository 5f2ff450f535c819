//! WebSocket endpoints: `/echo`, `/chat/{room}` and the native protocol at
//! `/connection/websocket`.
//!
//! [`upgrade`] checks the handshake and answers 101 or an HTTP error with a reason; the
//! upgraded socket is then driven by [`connection`], one task per connection.

mod connection;
pub(crate) mod direct;
pub(crate) mod heartbeat;
mod raw;
mod upgrade;

pub(crate) use connection::Out;
pub(crate) use raw::{data_frame, NATIVE_ONLY};
pub(crate) use upgrade::{chat, check_origin, echo, native};

/// Locks a mutex whose data stays consistent even if a holder panicked (every update under these
/// locks is a single push, swap or flag change), so a poisoned lock is still usable.
fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
