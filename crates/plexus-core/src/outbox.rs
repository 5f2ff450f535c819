use std::collections::VecDeque;
use std::sync::{Arc, Mutex, OnceLock};

use tokio::sync::Notify;

use bytes::Bytes;

use crate::publication::{Membership, Publication};

/// Something for one connection to write.
#[derive(Debug, Clone)]
pub enum Delivery {
    Publication(Arc<Publication>),
    /// A publication with the one delivered to this connection before it in its channel, if
    /// any: for a subscriber that gets each publication as a difference from the last (see
    /// [`crate::Tailored::Chained`]).
    Chained {
        publication: Arc<Publication>,
        previous: Option<Arc<Publication>>,
        /// The subscription's chain ([`crate::Tailored::Chained`]).
        chain: u64,
    },
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
    /// The connection's expiry changed (the server API's `refresh`): Unix seconds, 0 for
    /// none. A protocol connection is closed with 3005 when it comes (at once if past).
    Refresh {
        expire_at: u64,
        /// New connection info (raw JSON), if it changes.
        info: Option<bytes::Bytes>,
    },
    /// The channel's stream may have gone on without this node (a broker connection was lost
    /// and restored): the connection must resubscribe and recover to learn what it missed.
    Resync { channel: Arc<str> },
    /// A finished frame to write as is (a reply completed asynchronously).
    Frame(Bytes),
    /// A protocol message completed asynchronously (an `rpc` reply), unframed: the session
    /// frames it for its transport.
    Reply(Bytes),
    /// The rest of a frame a [`DirectWriter`] could write only in part: it must go out next, and
    /// is never dropped (the stream would break).
    Rest(Bytes),
    /// Send the peer the transport's heartbeat (a WebSocket ping, the protocol's `{}`).
    Heartbeat,
    /// The peer has not answered a heartbeat in time: close the connection.
    HeartbeatTimeout,
    /// The server is shutting down: close the connection the transport's way.
    Shutdown,
}

impl Delivery {
    /// Bytes this delivery counts for in an outbox.
    pub fn weight(&self) -> usize {
        match self {
            Delivery::Publication(publication) | Delivery::Chained { publication, .. } => {
                publication.weight()
            }
            Delivery::Join(_) | Delivery::Leave(_) => 128,
            Delivery::Control(Control::Frame(frame)) => frame.len() + 32,
            // A command's reply is the connection's own request, not a backlog of deliveries:
            // it must not make room for fewer of them, or push the connection over its limit
            // (an `rpc` reply may be large; a connection has few in flight, see the session).
            Delivery::Control(_) => 64,
        }
    }
}

/// Whether an outbox still accepts publications.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutboxState {
    Open,
    /// More bytes were queued than the limit allows: the connection is too slow and must be
    /// disconnected (close code 3008). Its queue was dropped to free the memory at once, all but
    /// the rest of a frame begun ([`Control::Rest`]), which the connection completes first.
    Overflowed,
    /// The connection is going away.
    Closed,
}

/// Writes a parked connection's deliveries to its socket from outside the connection's task.
///
/// A connection whose task has nothing left to write *parks* its outbox ([`Outbox::park`]).
/// While parked, a delivery does not wake the task: the outbox asks its writer to
/// [`schedule`](DirectWriter::schedule) a flush, and the writer later calls
/// [`Outbox::flush_parked`], which hands it the queue. One flusher serving many connections
/// writes each connection's pending frames in one system call, without a task wake-up per
/// connection; when more publications arrive than it can write one by one, they wait together
/// and go out together. A connection that cannot take everything at once (its socket is full, or
/// a delivery needs the task, like a close) is unparked and its task takes over.
pub trait DirectWriter: Send + Sync {
    /// `outbox`, parked, just went from empty to non-empty: arrange for
    /// [`Outbox::flush_parked`] to be called soon. Must not call it from within (the caller may
    /// hold a channel's lock).
    fn schedule(&self, outbox: Arc<Outbox>);

    /// Writes, without waiting, as much of `items` as the socket takes now, removing from the
    /// front what went out whole; what was cut short goes back to the front as
    /// [`Control::Rest`] with the bytes still due. Returns true if `items` is now empty; false
    /// if the rest needs the connection's task (the socket is full, an item only the task can
    /// handle, or an error the task will see on its own write).
    fn write(&self, items: &mut VecDeque<Delivery>) -> bool;
}

/// The bytes `items` count for (they fit under an outbox's limit, so in 32 bits).
fn weight_of(items: &VecDeque<Delivery>) -> u32 {
    items.iter().map(Delivery::weight).sum::<usize>() as u32
}

#[derive(Debug)]
struct Queue {
    items: VecDeque<Delivery>,
    /// Sum of the items' [`Delivery::weight`] (at most `limit`, so 32 bits do: every outbox
    /// of every connection has one, and its size class counts).
    bytes: u32,
    state: OutboxState,
    /// The connection's task waits with nothing to write: deliveries go to the writer.
    parked: bool,
}

/// One connection's queue of publications waiting to be written, bounded in bytes.
///
/// The hub pushes; the connection's task waits on [`Outbox::ready`] and drains. A push never
/// blocks and never waits for the socket, so one slow reader cannot slow a broadcast: when its
/// queue passes `limit` it is marked [`OutboxState::Overflowed`] and left out from then on.
pub struct Outbox {
    queue: Mutex<Queue>,
    /// Wakes the connection when the queue goes from empty to non-empty or changes state.
    notify: Notify,
    limit: u32,
    /// Writes for the connection while it is parked; set once, by the connection.
    writer: OnceLock<Arc<dyn DirectWriter>>,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Outbox")
            .field("queue", &self.queue)
            .field("limit", &self.limit)
            .field("direct", &self.writer.get().is_some())
            .finish()
    }
}

impl Outbox {
    /// An outbox that holds up to `limit` bytes (at most 4 GiB).
    pub fn new(limit: usize) -> Outbox {
        let limit = u32::try_from(limit).unwrap_or(u32::MAX);
        Outbox {
            queue: Mutex::new(Queue {
                items: VecDeque::new(),
                bytes: 0,
                state: OutboxState::Open,
                parked: false,
            }),
            notify: Notify::new(),
            limit,
            writer: OnceLock::new(),
        }
    }

    /// Lets this outbox be parked and written by `writer` (see [`DirectWriter`]). Returns false
    /// if it already has a writer.
    pub fn set_writer(&self, writer: Arc<dyn DirectWriter>) -> bool {
        self.writer.set(writer).is_ok()
    }

    /// The connection's task has nothing to write and is about to wait: from now on deliveries
    /// go to the writer. Returns false (and stays unparked) if there is no writer, something is
    /// queued, or the outbox is no longer open.
    pub fn park(&self) -> bool {
        if self.writer.get().is_none() {
            return false;
        }
        let mut queue = self.lock();
        if !queue.items.is_empty() || queue.state != OutboxState::Open {
            return false;
        }
        queue.parked = true;
        true
    }

    /// The connection's task is about to write: the writer must stop. Waits for a flush in
    /// progress to finish (it holds the queue's lock), so the task's writes come after it.
    pub fn unpark(&self) {
        self.lock().parked = false;
    }

    /// Hands a parked outbox back to its task, woken (the writer is going away).
    pub fn unpark_and_wake(&self) {
        self.lock().parked = false;
        self.notify.notify_one();
    }

    /// For the writer: writes what is queued while the outbox stays parked; if the writer
    /// cannot finish, unparks it and wakes the connection's task to write the rest.
    pub fn flush_parked(&self) {
        let Some(writer) = self.writer.get() else {
            return;
        };
        let mut queue = self.lock();
        if !queue.parked || queue.items.is_empty() || queue.state != OutboxState::Open {
            return; // the task has taken over (a state change wakes it by itself)
        }
        let done = writer.write(&mut queue.items);
        queue.bytes = weight_of(&queue.items);
        if queue.items.is_empty() && queue.items.capacity() > 16 {
            queue.items = VecDeque::new();
        }
        if !done {
            queue.parked = false;
            drop(queue);
            self.notify.notify_one();
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
    pub fn push(self: &Arc<Self>, delivery: Delivery) -> Result<(), OutboxState> {
        let mut queue = self.lock();
        if queue.state != OutboxState::Open {
            return Err(queue.state);
        }
        let weight = delivery.weight();
        if queue.bytes as usize + weight > self.limit as usize {
            queue.state = OutboxState::Overflowed;
            // The rest of a frame a direct writer wrote in part stays: the stream breaks unless
            // it is completed before the close.
            queue
                .items
                .retain(|item| matches!(item, Delivery::Control(Control::Rest(_))));
            queue.bytes = weight_of(&queue.items);
            if queue.items.is_empty() {
                queue.items = VecDeque::new();
            }
            drop(queue);
            self.notify.notify_one();
            return Err(OutboxState::Overflowed);
        }
        self.enqueue(queue, delivery, weight);
        Ok(())
    }

    /// Queues a command for this connection. It is not subject to the byte limit (the server
    /// sends few of them); it is dropped only when the connection is going away anyway.
    pub fn push_control(self: &Arc<Self>, control: Control) -> bool {
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
        self: &Arc<Self>,
        mut queue: std::sync::MutexGuard<'_, Queue>,
        delivery: Delivery,
        weight: usize,
    ) {
        let was_empty = queue.items.is_empty();
        queue.items.push_back(delivery);
        queue.bytes += weight as u32; // below the limit, which fits in 32 bits
        let parked = queue.parked;
        drop(queue);
        if was_empty {
            match self.writer.get() {
                Some(writer) if parked => writer.schedule(self.clone()),
                _ => self.notify.notify_one(),
            }
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
            queue.bytes -= weight as u32;
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
        let outbox = Arc::new(Outbox::new(10_000));
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
        let outbox = Arc::new(Outbox::new(1000));
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
    fn overflow_keeps_the_rest_of_a_frame_begun() {
        let outbox = Arc::new(Outbox::new(1000));
        // The rest of a frame a direct writer wrote in part comes back at the front.
        outbox.push_control(Control::Rest(Bytes::from_static(b"rest")));
        outbox.push_control(Control::Frame(Bytes::from_static(b"reply")));
        assert!(outbox.push(publication(500)).is_ok());
        assert_eq!(outbox.push(publication(500)), Err(OutboxState::Overflowed));
        let mut out = Vec::new();
        assert_eq!(outbox.drain(usize::MAX, &mut out), OutboxState::Overflowed);
        assert!(
            matches!(&out[..], [Delivery::Control(Control::Rest(rest))] if &rest[..] == b"rest")
        );
    }

    #[test]
    fn control_is_not_limited() {
        let outbox = Arc::new(Outbox::new(100));
        for _ in 0..10 {
            assert!(outbox.push_control(Control::Frame(Bytes::from(vec![0; 50]))));
        }
        assert_eq!(outbox.state(), OutboxState::Open);
    }

    /// A large reply queued first does not make the next publication overflow the outbox.
    #[test]
    fn a_reply_does_not_count_against_deliveries() {
        let outbox = Arc::new(Outbox::new(2_000));
        assert!(outbox.push_control(Control::Reply(Bytes::from(vec![b'x'; 100_000]))));
        assert!(outbox.push(publication(936)).is_ok());
        let mut out = Vec::new();
        assert_eq!(outbox.drain(usize::MAX, &mut out), OutboxState::Open);
        assert_eq!(out.len(), 2);
    }

    #[test]
    fn drain_respects_the_byte_budget() {
        let outbox = Arc::new(Outbox::new(100_000));
        for _ in 0..10 {
            outbox.push(publication(936)).unwrap(); // weight 1000
        }
        let mut out = Vec::new();
        outbox.drain(2500, &mut out);
        assert_eq!(out.len(), 3);
        assert!(!outbox.is_empty());
    }

    /// A writer that takes up to `room` items per flush, recording what it wrote.
    struct Taking {
        room: Mutex<usize>,
        written: Mutex<Vec<usize>>,
        scheduled: Mutex<Vec<Arc<Outbox>>>,
    }

    impl DirectWriter for Taking {
        fn schedule(&self, outbox: Arc<Outbox>) {
            self.scheduled.lock().unwrap().push(outbox);
        }

        fn write(&self, items: &mut VecDeque<Delivery>) -> bool {
            let mut room = self.room.lock().unwrap();
            while *room > 0 {
                let Some(item) = items.pop_front() else { break };
                self.written.lock().unwrap().push(size(&item));
                *room -= 1;
            }
            items.is_empty()
        }
    }

    fn taking(room: usize) -> Arc<Taking> {
        Arc::new(Taking {
            room: Mutex::new(room),
            written: Mutex::new(Vec::new()),
            scheduled: Mutex::new(Vec::new()),
        })
    }

    #[tokio::test]
    async fn a_parked_outbox_goes_to_its_writer_and_back_to_the_task_when_it_stops() {
        let outbox = Arc::new(Outbox::new(100_000));
        assert!(!outbox.park(), "no writer, no parking");
        let writer = taking(2);
        assert!(outbox.set_writer(writer.clone()));
        assert!(outbox.park());

        outbox.push(publication(1)).unwrap();
        outbox.push(publication(2)).unwrap();
        assert_eq!(writer.scheduled.lock().unwrap().len(), 1, "scheduled once");
        outbox.flush_parked();
        assert_eq!(*writer.written.lock().unwrap(), [1, 2]);
        assert!(outbox.is_empty());

        // Still parked: the next delivery is scheduled again; the writer takes one of two.
        outbox.push(publication(3)).unwrap();
        outbox.push(publication(4)).unwrap();
        assert_eq!(writer.scheduled.lock().unwrap().len(), 2);
        *writer.room.lock().unwrap() = 1;
        outbox.flush_parked();
        assert_eq!(*writer.written.lock().unwrap(), [1, 2, 3]);
        // Unparked, with the task woken for the rest, in order.
        tokio::time::timeout(std::time::Duration::from_secs(1), outbox.ready())
            .await
            .expect("the task is woken");
        outbox.push(publication(5)).unwrap();
        assert_eq!(
            writer.scheduled.lock().unwrap().len(),
            2,
            "no longer parked"
        );
        let mut out = Vec::new();
        outbox.drain(usize::MAX, &mut out);
        assert_eq!(out.iter().map(size).collect::<Vec<_>>(), [4, 5]);
        assert!(outbox.park(), "parks again once drained");
        outbox.unpark();
        outbox.push(publication(6)).unwrap();
        outbox.flush_parked();
        assert_eq!(
            writer.written.lock().unwrap().len(),
            3,
            "unparked: the writer keeps out"
        );
    }

    #[test]
    fn a_closed_outbox_does_not_park() {
        let outbox = Arc::new(Outbox::new(100));
        outbox.set_writer(taking(10));
        outbox.close();
        assert!(!outbox.park());
    }
}
