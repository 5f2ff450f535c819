use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use bytes::Bytes;

use crate::publication::{Membership, Publication};

/// Something for one connection to write.
#[derive(Debug, Clone)]
pub enum Delivery {
    Publication(Arc<Publication>),
    Join(Arc<Membership>),
    Leave(Arc<Membership>),
    /// For this connection only.
    Control(Control),
}

/// A command for one connection, from the server API or from its own asynchronous work.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Control {
    /// Close the connection with a disconnect code and reason.
    Disconnect { code: u16, reason: Arc<str> },
    /// The server unsubscribed the connection from a channel.
    Unsubscribe {
        channel: Arc<str>,
        code: u16,
        reason: Arc<str>,
    },
    /// The server subscribes the connection to a channel.
    Subscribe { channel: Arc<str> },
    /// The channel's stream may have gone on without this node (a broker connection was lost
    /// and restored): the connection must resubscribe and recover to learn what it missed.
    Resync { channel: Arc<str> },
    /// A finished frame to write as is (a reply completed asynchronously).
    Frame(Bytes),
}

impl Delivery {
    /// Bytes this delivery counts for in an outbox.
    pub fn weight(&self) -> usize {
        match self {
            Delivery::Publication(publication) => publication.weight(),
            Delivery::Join(_) | Delivery::Leave(_) => 128,
            Delivery::Control(Control::Frame(frame)) => frame.len() + 32,
            Delivery::Control(_) => 64,
        }
    }
}

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
    items: VecDeque<Delivery>,
    /// Sum of the items' [`Delivery::weight`].
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

    /// Queues a delivery from a channel. An error means the caller should stop delivering to
    /// this outbox: it overflowed just now or before, or its connection is closing.
    pub fn push(&self, delivery: Delivery) -> Result<(), OutboxState> {
        let mut queue = self.lock();
        if queue.state != OutboxState::Open {
            return Err(queue.state);
        }
        let weight = delivery.weight();
        if queue.bytes + weight > self.limit {
            queue.state = OutboxState::Overflowed;
            queue.items = VecDeque::new();
            queue.bytes = 0;
            drop(queue);
            self.notify.notify_one();
            return Err(OutboxState::Overflowed);
        }
        self.enqueue(queue, delivery, weight);
        Ok(())
    }

    /// Queues a command for this connection. It is not subject to the byte limit (the server
    /// sends few of them); it is dropped only when the connection is going away anyway.
    pub fn push_control(&self, control: Control) -> bool {
        let queue = self.lock();
        if queue.state != OutboxState::Open {
            return false;
        }
        let delivery = Delivery::Control(control);
        let weight = delivery.weight();
        self.enqueue(queue, delivery, weight);
        true
    }

    fn enqueue(
        &self,
        mut queue: std::sync::MutexGuard<'_, Queue>,
        delivery: Delivery,
        weight: usize,
    ) {
        let was_empty = queue.items.is_empty();
        queue.items.push_back(delivery);
        queue.bytes += weight;
        drop(queue);
        if was_empty {
            self.notify.notify_one();
        }
    }

    /// Moves queued deliveries into `out`, up to about `max_bytes`, and returns the state.
    pub fn drain(&self, max_bytes: usize, out: &mut Vec<Delivery>) -> OutboxState {
        let mut queue = self.lock();
        let mut taken = 0;
        while taken < max_bytes {
            let Some(delivery) = queue.items.pop_front() else {
                break;
            };
            let weight = delivery.weight();
            taken += weight;
            queue.bytes -= weight;
            out.push(delivery);
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

    fn publication(size: usize) -> Delivery {
        Delivery::Publication(Arc::new(Publication::new(
            "chat:a".into(),
            MessageKind::Binary,
            vec![0; size].into(),
            None,
        )))
    }

    fn size(delivery: &Delivery) -> usize {
        match delivery {
            Delivery::Publication(publication) => publication.data.len(),
            _ => panic!("not a publication"),
        }
    }

    #[tokio::test]
    async fn wakes_and_drains_in_order() {
        let outbox = Outbox::new(10_000);
        assert!(outbox.push(publication(1)).is_ok());
        assert!(outbox.push(publication(2)).is_ok());
        outbox.ready().await;
        let mut out = Vec::new();
        assert_eq!(outbox.drain(usize::MAX, &mut out), OutboxState::Open);
        assert_eq!(out.iter().map(size).collect::<Vec<_>>(), [1, 2]);
        assert!(outbox.is_empty());
    }

    #[test]
    fn overflow_drops_the_queue_and_refuses_more() {
        let outbox = Outbox::new(1000);
        assert!(outbox.push(publication(500)).is_ok());
        assert_eq!(outbox.push(publication(500)), Err(OutboxState::Overflowed));
        assert_eq!(outbox.state(), OutboxState::Overflowed);
        assert!(outbox.is_empty());
        assert_eq!(outbox.push(publication(1)), Err(OutboxState::Overflowed));
        outbox.close();
        assert_eq!(
            outbox.state(),
            OutboxState::Overflowed,
            "close keeps the overflow"
        );
        assert!(!outbox.push_control(Control::Subscribe {
            channel: "x".into()
        }));
    }

    #[test]
    fn control_is_not_limited() {
        let outbox = Outbox::new(100);
        for _ in 0..10 {
            assert!(outbox.push_control(Control::Frame(Bytes::from(vec![0; 50]))));
        }
        assert_eq!(outbox.state(), OutboxState::Open);
    }

    #[test]
    fn drain_respects_the_byte_budget() {
        let outbox = Outbox::new(100_000);
        for _ in 0..10 {
            outbox.push(publication(936)).unwrap(); // weight 1000
        }
        let mut out = Vec::new();
        outbox.drain(2500, &mut out);
        assert_eq!(out.len(), 3);
        assert!(!outbox.is_empty());
    }
}
