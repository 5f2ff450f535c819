use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use crate::publication::Publication;

/// Whether an outbox still accepts publications.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutboxState {
    Open,
    /// More bytes were queued than the limit allows: the connection is too slow and must be
    /// disconnected (close code 3008). Its queue was dropped to free the memory at once.
    Overflowed,
    /// The connection is going away.
    Closed,
}

#[derive(Debug)]
struct Queue {
    items: VecDeque<Arc<Publication>>,
    /// Sum of the items' [`Publication::weight`].
    bytes: usize,
    state: OutboxState,
}

/// One connection's queue of publications waiting to be written, bounded in bytes.
///
/// The hub pushes; the connection's task waits on [`Outbox::ready`] and drains. A push never
/// blocks and never waits for the socket, so one slow reader cannot slow a broadcast: when its
/// queue passes `limit` it is marked [`OutboxState::Overflowed`] and left out from then on.
#[derive(Debug)]
pub struct Outbox {
    queue: Mutex<Queue>,
    /// Wakes the connection when the queue goes from empty to non-empty or changes state.
    notify: Notify,
    limit: usize,
}

impl Outbox {
    pub fn new(limit: usize) -> Outbox {
        Outbox {
            queue: Mutex::new(Queue {
                items: VecDeque::new(),
                bytes: 0,
                state: OutboxState::Open,
            }),
            notify: Notify::new(),
            limit,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        // A panic while holding this lock cannot leave the queue inconsistent (every update is
        // a single push or drain), so a poisoned lock is still usable.
        self.queue
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Queues a publication. Returns false if the outbox is not open (any more), in which case
    /// the caller should stop delivering to it.
    pub fn push(&self, publication: Arc<Publication>) -> bool {
        let mut queue = self.lock();
        if queue.state != OutboxState::Open {
            return false;
        }
        let weight = publication.weight();
        if queue.bytes + weight > self.limit {
            queue.state = OutboxState::Overflowed;
            queue.items = VecDeque::new();
            queue.bytes = 0;
            drop(queue);
            self.notify.notify_one();
            return false;
        }
        let was_empty = queue.items.is_empty();
        queue.items.push_back(publication);
        queue.bytes += weight;
        drop(queue);
        if was_empty {
            self.notify.notify_one();
        }
        true
    }

    /// Moves queued publications into `out`, up to about `max_bytes`, and returns the state.
    pub fn drain(&self, max_bytes: usize, out: &mut Vec<Arc<Publication>>) -> OutboxState {
        let mut queue = self.lock();
        let mut taken = 0;
        while taken < max_bytes {
            let Some(publication) = queue.items.pop_front() else {
                break;
            };
            let weight = publication.weight();
            taken += weight;
            queue.bytes -= weight;
            out.push(publication);
        }
        if queue.items.is_empty() && queue.items.capacity() > 16 {
            queue.items = VecDeque::new();
        }
        queue.state
    }

    pub fn is_empty(&self) -> bool {
        self.lock().items.is_empty()
    }

    pub fn state(&self) -> OutboxState {
        self.lock().state
    }

    /// Stops accepting publications (the connection is closing).
    pub fn close(&self) {
        let mut queue = self.lock();
        if queue.state == OutboxState::Open {
            queue.state = OutboxState::Closed;
        }
    }

    /// Resolves when something was queued or the state changed since the last call.
    pub async fn ready(&self) {
        self.notify.notified().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MessageKind;

    fn publication(size: usize) -> Arc<Publication> {
        Arc::new(Publication::new(
            "chat:a".into(),
            MessageKind::Binary,
            vec![0; size].into(),
            None,
        ))
    }

    #[tokio::test]
    async fn wakes_and_drains_in_order() {
        let outbox = Outbox::new(10_000);
        assert!(outbox.push(publication(1)));
        assert!(outbox.push(publication(2)));
        outbox.ready().await;
        let mut out = Vec::new();
        assert_eq!(outbox.drain(usize::MAX, &mut out), OutboxState::Open);
        assert_eq!(out.iter().map(|p| p.data.len()).collect::<Vec<_>>(), [1, 2]);
        assert!(outbox.is_empty());
    }

    #[test]
    fn overflow_drops_the_queue_and_refuses_more() {
        let outbox = Outbox::new(1000);
        assert!(outbox.push(publication(500)));
        assert!(!outbox.push(publication(500)));
        assert_eq!(outbox.state(), OutboxState::Overflowed);
        assert!(outbox.is_empty());
        assert!(!outbox.push(publication(1)));
    }

    #[test]
    fn drain_respects_the_byte_budget() {
        let outbox = Outbox::new(100_000);
        for _ in 0..10 {
            outbox.push(publication(936)); // weight 1000
        }
        let mut out = Vec::new();
        outbox.drain(2500, &mut out);
        assert_eq!(out.len(), 3);
        assert!(!outbox.is_empty());
    }
}
