//! The node's subscriptions: `{prefix}.control` always, and `{prefix}.pub.{token}` for every
//! watched channel, each read by a task of its own that hands what arrives, decoded, to the
//! hub. The NATS client subscribes them again by itself after a reconnection.
//!
//! Publications with an offset are delivered in offset order: one that arrives ahead of a
//! missing offset (another node's publication still on its way, or one lost while the
//! connection was down) waits up to [`GAP_WAIT`] for it, then the gap is filled from history
//! (what history no longer has is skipped). A publication whose offset was already delivered
//! is dropped; one from a new epoch starts the order over. The order of a channel starts from
//! its stream's last offset when it is watched (what came before is in history for the
//! subscribers that read it after the watch), so the first publications to arrive need not
//! be the first published.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use plexus_core::{Deliver, Delivery, HistoryQuery, Membership, Publication};
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::codec::{decode_command, decode_envelope, Envelope};
use crate::store::{bounded, LinkError, Store, EPOCH, RESPONSE_TIMEOUT};

/// How long a publication that arrived ahead of a missing offset waits for it.
pub const GAP_WAIT: Duration = Duration::from_millis(200);

/// Local delivery progress of a watched channel, for publishers waiting to see their own
/// publication delivered here.
#[derive(Default)]
struct Progress {
    delivered: u64,
    waiters: Vec<(u64, oneshot::Sender<()>)>,
}

struct Watched {
    /// Tells this watch from a later one of the same channel.
    id: u64,
    stop: CancellationToken,
    progress: Progress,
}

#[derive(Default)]
struct State {
    next_id: u64,
    watched: HashMap<Arc<str>, Watched>,
}

/// The subscriptions' shared state.
pub struct Subscriber {
    store: Arc<Store>,
    deliver: Arc<dyn Deliver>,
    state: Mutex<State>,
    /// Whether the control subscription is known to the server.
    control_ready: watch::Sender<bool>,
    cancel: CancellationToken,
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Subscriber {
    pub fn new(
        store: Arc<Store>,
        deliver: Arc<dyn Deliver>,
        cancel: &CancellationToken,
    ) -> Arc<Subscriber> {
        Arc::new(Subscriber {
            store,
            deliver,
            state: Mutex::new(State::default()),
            control_ready: watch::channel(false).0,
            cancel: cancel.clone(),
        })
    }

    /// Subscribes the control subject and delivers commands until the engine stops; the
    /// subscription is queued at once, even before the connection is up.
    pub async fn run_control(self: Arc<Subscriber>) {
        let mut subscription = loop {
            match self
                .store
                .client
                .subscribe(self.store.names.control.clone())
                .await
            {
                Ok(subscription) => break subscription,
                Err(error) => {
                    tracing::warn!(%error, "cannot subscribe to nats control subject");
                    tokio::select! {
                        _ = self.cancel.cancelled() => return,
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        };
        loop {
            let message = tokio::select! {
                _ = self.cancel.cancelled() => return,
                message = subscription.next() => match message {
                    Some(message) => message,
                    None => return,
                },
            };
            match decode_command(&message.payload) {
                Ok(command) => self.deliver.command(&command),
                Err(_) => tracing::warn!("undecodable node command"),
            }
        }
    }

    /// The control subscription is known to the server (after every setup).
    pub fn control_subscribed(&self) {
        self.control_ready.send_replace(true);
    }

    /// Waits (at most `timeout`) for the control subscription.
    pub async fn control_started(&self, timeout: Duration) -> Result<(), LinkError> {
        let mut ready = self.control_ready.subscribe();
        let waited = tokio::time::timeout(timeout, ready.wait_for(|ready| *ready))
            .await
            .map(|result| result.is_ok());
        match waited {
            Ok(true) => Ok(()),
            Ok(false) => Err(LinkError::Disconnected("shut down".into())),
            Err(_) => Err(LinkError::Timeout(timeout)),
        }
    }

    /// The connection is down: nobody waits for local deliveries until it is back.
    pub fn connection_lost(&self) {
        let mut state = lock(&self.state);
        for watched in state.watched.values_mut() {
            watched.progress.waiters.clear();
        }
    }

    /// Deliveries may have been lost while the connection was down.
    pub fn interrupted(&self) {
        self.deliver.interrupted();
    }

    /// Subscribes to (or unsubscribes from) a channel's subject.
    pub async fn watch(self: &Arc<Self>, channel: &str, watching: bool) -> Result<(), LinkError> {
        if !watching {
            if let Some(watched) = lock(&self.state).watched.remove(channel) {
                watched.stop.cancel();
            }
            return Ok(());
        }
        self.store.usable_soon().await?;
        let (id, stop) = {
            let mut state = lock(&self.state);
            if state.watched.contains_key(channel) {
                return Ok(());
            }
            state.next_id += 1;
            let id = state.next_id;
            let stop = self.cancel.child_token();
            state.watched.insert(
                channel.into(),
                Watched {
                    id,
                    stop: stop.clone(),
                    progress: Progress::default(),
                },
            );
            (id, stop)
        };
        let subscribed = async {
            let subject = self.store.names.pub_subject(channel);
            let subscription = bounded(self.store.client.subscribe(subject)).await?;
            // Known to the server before this returns, so nothing published after is missed.
            self.store.sync().await?;
            // Where deliveries start: everything up to here is in history already. (Without
            // it, the first arrival is taken as the start, as before.)
            let start = match self.store.position_now(channel).await {
                Ok(start) => Some(start),
                Err(error) => {
                    tracing::debug!(channel, %error, "stream position unknown at watch");
                    None
                }
            };
            Ok::<_, LinkError>((subscription, start))
        }
        .await;
        match subscribed {
            Ok((subscription, start)) => {
                let channel: Arc<str> = channel.into();
                let order = match start {
                    Some((epoch, offset)) => {
                        // Publishers waiting for an offset up to here need not wait.
                        if let Some(watched) = lock(&self.state).watched.get_mut(&*channel) {
                            if watched.id == id {
                                let progress = &mut watched.progress;
                                progress.delivered = offset;
                                progress.waiters.retain(|(waiting_for, sender)| {
                                    *waiting_for > offset && !sender.is_closed()
                                });
                            }
                        }
                        Order::starting_after(epoch, offset)
                    }
                    None => Order::default(),
                };
                tokio::spawn(
                    self.clone()
                        .read_channel(channel, subscription, order, stop),
                );
                Ok(())
            }
            Err(error) => {
                // The hub gives up on the channel: forget it (unless watched again meanwhile).
                let mut state = lock(&self.state);
                if state.watched.get(channel).is_some_and(|w| w.id == id) {
                    state.watched.remove(channel);
                }
                stop.cancel();
                Err(error)
            }
        }
    }

    /// A receiver that completes once the publication at `offset` of `channel` has been
    /// delivered here, or `None` if there is nothing to wait for (not watched, not
    /// connected, or already delivered).
    pub fn delivery_of(&self, channel: &str, offset: u64) -> Option<oneshot::Receiver<()>> {
        if !self.store.connected() {
            return None;
        }
        let mut state = lock(&self.state);
        let progress = &mut state.watched.get_mut(channel)?.progress;
        if progress.delivered >= offset {
            return None;
        }
        let (sender, receiver) = oneshot::channel();
        progress.waiters.push((offset, sender));
        Some(receiver)
    }

    fn delivered(&self, channel: &str, offset: u64) {
        let mut state = lock(&self.state);
        if let Some(watched) = state.watched.get_mut(channel) {
            let progress = &mut watched.progress;
            progress.delivered = offset;
            // Dropping a waiter's sender wakes it; give up on those nobody awaits any more.
            progress
                .waiters
                .retain(|(waiting_for, sender)| *waiting_for > offset && !sender.is_closed());
        }
    }

    async fn read_channel(
        self: Arc<Self>,
        channel: Arc<str>,
        mut subscription: async_nats::Subscriber,
        mut order: Order,
        stop: CancellationToken,
    ) {
        loop {
            let deadline = order.deadline;
            tokio::select! {
                _ = stop.cancelled() => break,
                message = subscription.next() => match message {
                    Some(message) => self.receive(&channel, &message, &mut order),
                    None => break,
                },
                () = sleep_until(deadline) => self.fill_gap(&channel, &mut order).await,
            }
        }
        // Dropping the subscription unsubscribes it.
    }

    fn receive(&self, channel: &Arc<str>, message: &async_nats::Message, order: &mut Order) {
        match decode_envelope(channel.clone(), &message.payload) {
            Ok(Envelope::Publication(publication)) => {
                let epoch = message
                    .headers
                    .as_ref()
                    .and_then(|headers| headers.get(EPOCH))
                    .map(|epoch| Arc::<str>::from(epoch.as_str()));
                let publication = Arc::new(*publication);
                match epoch {
                    Some(epoch) if publication.offset > 0 => {
                        for ready in order.arrived(epoch, publication) {
                            self.deliver_publication(channel, ready);
                        }
                    }
                    _ => self.deliver_publication(channel, publication),
                }
            }
            Ok(Envelope::Join(client)) => {
                self.deliver
                    .deliver(Delivery::Join(Arc::new(Membership::new(
                        channel.clone(),
                        client,
                    ))))
            }
            Ok(Envelope::Leave(client)) => {
                self.deliver
                    .deliver(Delivery::Leave(Arc::new(Membership::new(
                        channel.clone(),
                        client,
                    ))))
            }
            Err(_) => tracing::warn!(channel = &**channel, "undecodable message"),
        }
    }

    fn deliver_publication(&self, channel: &str, publication: Arc<Publication>) {
        let offset = publication.offset;
        self.deliver.deliver(Delivery::Publication(publication));
        if offset > 0 {
            self.delivered(channel, offset);
        }
    }

    /// The wait for a missing offset is over: take what history has, deliver in order.
    async fn fill_gap(&self, channel: &Arc<str>, order: &mut Order) {
        let Some((epoch, after)) = order.last.clone() else {
            order.deadline = None;
            return;
        };
        let query = HistoryQuery {
            since: Some(after),
            ..HistoryQuery::default()
        };
        let page = tokio::time::timeout(RESPONSE_TIMEOUT, self.store.history(channel, query))
            .await
            .unwrap_or(Err(LinkError::Timeout(RESPONSE_TIMEOUT)));
        let found = match page {
            Ok(page) if page.top.epoch == epoch => page.publications,
            Ok(_) => Vec::new(),
            Err(error) => {
                tracing::debug!(channel = &**channel, %error, "cannot fill a gap from history");
                Vec::new()
            }
        };
        for publication in order.filled(found) {
            self.deliver_publication(channel, publication);
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Offset order of one channel's publications.
#[derive(Default)]
struct Order {
    /// Epoch and offset of the last publication delivered.
    last: Option<(Arc<str>, u64)>,
    /// Arrived ahead of a missing offset (of the epoch in `last`).
    ahead: BTreeMap<u64, Arc<Publication>>,
    /// When to stop waiting for the missing offset.
    deadline: Option<Instant>,
    /// Before anything arrived: the stream's epoch (none yet) and last offset when the
    /// channel was watched.
    start: Option<(Option<Arc<str>>, u64)>,
}

impl Order {
    fn starting_after(epoch: Option<Arc<str>>, offset: u64) -> Order {
        Order {
            start: Some((epoch, offset)),
            ..Order::default()
        }
    }

    /// A publication arrived: those now deliverable, in order.
    fn arrived(&mut self, epoch: Arc<str>, publication: Arc<Publication>) -> Vec<Arc<Publication>> {
        let offset = publication.offset;
        if self.last.is_none() {
            match self.start.take() {
                // Ordered from the start, as if the start had been delivered; a stream begun
                // since (another epoch) from its first offset.
                Some((Some(start_epoch), start)) if start_epoch == epoch => {
                    self.last = Some((epoch.clone(), start));
                }
                Some(_) => self.last = Some((epoch.clone(), 0)),
                None => {
                    self.last = Some((epoch, offset));
                    return vec![publication];
                }
            }
        }
        let Some((last_epoch, last)) = &mut self.last else {
            unreachable!("set above");
        };
        if *last_epoch != epoch {
            // A new stream: what waited belongs to the old one.
            let mut ready: Vec<_> = std::mem::take(&mut self.ahead).into_values().collect();
            ready.push(publication);
            self.last = Some((epoch, offset));
            self.deadline = None;
            return ready;
        }
        if offset <= *last {
            return Vec::new(); // delivered already (from history)
        }
        if offset > *last + 1 {
            self.ahead.insert(offset, publication);
            self.deadline
                .get_or_insert_with(|| Instant::now() + GAP_WAIT);
            return Vec::new();
        }
        *last = offset;
        let mut ready = vec![publication];
        while let Some(entry) = self.ahead.first_entry() {
            if *entry.key() != *last + 1 {
                break;
            }
            *last += 1;
            ready.push(entry.remove());
        }
        if self.ahead.is_empty() {
            self.deadline = None;
        }
        ready
    }

    /// The gap is given up on, with what history had after the last delivered offset: every
    /// publication known past it, in order.
    fn filled(&mut self, from_history: Vec<Arc<Publication>>) -> Vec<Arc<Publication>> {
        self.deadline = None;
        let Some((_, last)) = &mut self.last else {
            return Vec::new();
        };
        let mut known = std::mem::take(&mut self.ahead);
        for publication in from_history {
            if publication.offset > *last {
                known.entry(publication.offset).or_insert(publication);
            }
        }
        if let Some(&newest) = known.keys().next_back() {
            *last = newest;
        }
        known.into_values().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use plexus_core::MessageKind;

    fn publication(offset: u64) -> Arc<Publication> {
        let stored = Publication::new("c".into(), MessageKind::Text, "x".into(), None).to_stored();
        Arc::new(Publication::from_stored("c".into(), offset, stored).unwrap())
    }

    fn offsets(publications: &[Arc<Publication>]) -> Vec<u64> {
        publications.iter().map(|p| p.offset).collect()
    }

    #[tokio::test]
    async fn publications_are_put_in_offset_order() {
        let mut order = Order::default();
        let e: Arc<str> = "e1".into();
        assert_eq!(offsets(&order.arrived(e.clone(), publication(5))), [5]);
        assert_eq!(
            offsets(&order.arrived(e.clone(), publication(7))),
            [] as [u64; 0]
        );
        assert!(order.deadline.is_some());
        assert_eq!(offsets(&order.arrived(e.clone(), publication(6))), [6, 7]);
        assert!(order.deadline.is_none());
        assert_eq!(
            offsets(&order.arrived(e.clone(), publication(6))),
            [] as [u64; 0]
        );
        // A gap given up on: history has 9, 10 came by.
        order.arrived(e.clone(), publication(10));
        assert_eq!(
            offsets(&order.filled(vec![publication(9), publication(10)])),
            [9, 10]
        );
        assert_eq!(offsets(&order.arrived(e.clone(), publication(11))), [11]);
        // History lost 12 and 13: delivered from 14 on.
        order.arrived(e.clone(), publication(14));
        assert_eq!(offsets(&order.filled(Vec::new())), [14]);
        // A new epoch starts over.
        assert_eq!(offsets(&order.arrived("e2".into(), publication(1))), [1]);
        assert_eq!(offsets(&order.arrived("e2".into(), publication(2))), [2]);
    }

    /// Watched at offset 3: 5 arriving first waits for 4, which another node published a
    /// moment before; 3 and below were in history already.
    #[tokio::test]
    async fn the_order_starts_where_the_stream_was_when_watched() {
        let e: Arc<str> = "e1".into();
        let mut order = Order::starting_after(Some(e.clone()), 3);
        assert_eq!(
            offsets(&order.arrived(e.clone(), publication(5))),
            [] as [u64; 0]
        );
        assert_eq!(offsets(&order.arrived(e.clone(), publication(4))), [4, 5]);
        assert_eq!(
            offsets(&order.arrived(e.clone(), publication(3))),
            [] as [u64; 0]
        );
        // A stream not begun yet: 1 is the first.
        let mut order = Order::starting_after(None, 0);
        assert_eq!(
            offsets(&order.arrived(e.clone(), publication(2))),
            [] as [u64; 0]
        );
        assert_eq!(offsets(&order.arrived(e.clone(), publication(1))), [1, 2]);
        // Watched at 500 of e1, and the stream lost since: e2 starts again from 1.
        let mut order = Order::starting_after(Some(e), 500);
        assert_eq!(offsets(&order.arrived("e2".into(), publication(1))), [1]);
    }
}
