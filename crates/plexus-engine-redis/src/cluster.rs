//! Redis Cluster: which master holds a channel's keys, and one writer per master.
//!
//! In cluster mode every key of a channel carries the channel as its hash tag
//! (`plexus:stream:{chat:lobby}`), so a channel's keys share one slot and its scripts run on one
//! node. A call is queued, in the call, on the writer of the master that holds its channel's
//! slot; each master has one pipelined writer (`writer::Writer`, the same as a single Redis's).
//!
//! The slot map comes from `CLUSTER SLOTS`, asked of a known master or else of the seed
//! addresses, on a connection kept from one reading to the next. It is asked again every [`REFRESH`], and soon after a writer meets `MOVED`, `ASK`,
//! `CLUSTERDOWN` or `TRYAGAIN` or loses its connection (a failover, a resharding). A call
//! answered `MOVED` or `ASK` goes on to the master named (after `ASKING` for `ASK`, which
//! holds only for the command after it, so the writer sends the two together; a master no map
//! lists yet gets a writer of its own), one answered `TRYAGAIN` again by its slot after
//! [`RETRY_PAUSE`] (at most [`crate::writer::MAX_REDIRECTS`] and
//! [`crate::writer::MAX_TRIES`] times); meanwhile the slot's new calls wait behind them
//! ([`Redirections`]). The calls after the new map go to the new master.
//! Writers of masters that left the map are stopped.
//!
//! Publications are read from the master that holds their channel ([`Shards`]): one pub/sub
//! connection per master, each subscribed to the channels of that master's slots. A
//! publication is published on its channel's master (by the script, or the writer routed
//! there), which delivers it to its own subscribers at once; read through another node, it
//! would cross the cluster bus first, whose links leave Nagle's algorithm on (tens of
//! milliseconds at times). Node commands, rare, go through one connection to any node
//! (`Source::Rotating`), which the bus reaches. When the map moves a channel to another
//! master, its new connection subscribes it and the hub is told deliveries may have been
//! missed (`Deliver::interrupted`), so subscribers recover through history.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use plexus_core::Deliver;
use redis::aio::MultiplexedConnection;
use redis::{Client, ConnectionAddr, ConnectionInfo, TlsCertificates, Value};
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio_util::sync::CancellationToken;

use crate::source::{Rotation, Source};
use crate::subscriber::{Role, Subscriber};
use crate::writer::{
    Backoff, ClusterLink, Health, LinkError, Redirect, Request, Writer, CONNECT_TIMEOUT,
};
use std::collections::VecDeque;
use std::sync::atomic::AtomicU64;

/// Hash slots of a Redis Cluster.
pub const SLOTS: usize = 16384;

/// How often the slot map is asked for when nothing suggests it changed.
pub const REFRESH: Duration = Duration::from_secs(10);

/// The shortest time between two refreshes of the slot map.
const MIN_REFRESH_GAP: Duration = Duration::from_millis(100);

/// How long a call waits before it is sent again after `TRYAGAIN`.
const RETRY_PAUSE: Duration = Duration::from_millis(100);

/// CRC16/XMODEM (polynomial 0x1021, initial value 0), the checksum Redis Cluster hashes keys
/// with.
fn crc16<'a>(bytes: impl IntoIterator<Item = &'a u8>) -> u16 {
    let mut crc: u16 = 0;
    for &byte in bytes {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// The hash tag of a key: the text between its first `{` and the next `}`, if not empty.
#[cfg(test)]
fn hash_tag(key: &[u8]) -> Option<&[u8]> {
    let open = key.iter().position(|&b| b == b'{')?;
    let rest = &key[open + 1..];
    let close = rest.iter().position(|&b| b == b'}')?;
    (close > 0).then(|| &rest[..close])
}

/// The slot of a key: that of its hash tag when it has one, else that of the whole key (as
/// Redis computes it; the tests hold `channel_slot` to it).
#[cfg(test)]
fn key_slot(key: &[u8]) -> u16 {
    crc16(hash_tag(key).unwrap_or(key)) % SLOTS as u16
}

/// The slot of every key of `channel` (`…:{channel}`), without building one.
pub fn channel_slot(channel: &str) -> u16 {
    let channel = channel.as_bytes();
    let tag_end = channel.iter().position(|&b| b == b'}');
    let crc = match tag_end {
        None => crc16(channel),
        Some(end) if end > 0 => crc16(&channel[..end]),
        // `{}…}`: an empty tag, so Redis hashes the whole key (`Router::send` refuses these).
        Some(_) => crc16(b"{".iter().chain(channel).chain(b"}")),
    };
    crc % SLOTS as u16
}

/// A master's address as `CLUSTER SLOTS` gives it.
pub(crate) type Address = (String, u16);

/// One slot range of `CLUSTER SLOTS` and its master.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotRange {
    pub first: u16,
    pub last: u16,
    pub master: Address,
}

fn integer(value: &Value) -> Option<i64> {
    match value {
        Value::Int(n) => Some(*n),
        Value::BulkString(bytes) => std::str::from_utf8(bytes).ok()?.parse().ok(),
        _ => None,
    }
}

fn text(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(bytes) => String::from_utf8(bytes.clone()).ok(),
        Value::SimpleString(text) => Some(text.clone()),
        _ => None,
    }
}

/// Reads a `CLUSTER SLOTS` reply. A master with no address (`""` or null) is `asked_host`, the
/// node that answered; one whose address is unknown (`?`) is left out (its slots are served by
/// no one until the map is read again).
pub fn parse_slots(reply: &Value, asked_host: &str) -> Result<Vec<SlotRange>, String> {
    let Value::Array(ranges) = reply else {
        return Err(format!("CLUSTER SLOTS answered {reply:?}"));
    };
    let ranges: Result<Vec<Option<SlotRange>>, String> = ranges
        .iter()
        .map(|range| {
            let Value::Array(fields) = range else {
                return Err(format!("a slot range is {range:?}"));
            };
            let (first, last) = match (
                fields.first().and_then(integer),
                fields.get(1).and_then(integer),
            ) {
                (Some(first), Some(last)) if 0 <= first && first <= last && last < SLOTS as i64 => {
                    (first as u16, last as u16)
                }
                _ => return Err(format!("bad slot range {fields:?}")),
            };
            let Some(Value::Array(master)) = fields.get(2) else {
                return Err(format!("slots {first}-{last} have no master"));
            };
            let host = match master.first() {
                None | Some(Value::Nil) => String::new(),
                Some(host) => text(host).ok_or_else(|| format!("bad host {host:?}"))?,
            };
            let port = master
                .get(1)
                .and_then(integer)
                .and_then(|port| u16::try_from(port).ok())
                .filter(|&port| port != 0)
                .ok_or_else(|| format!("slots {first}-{last}: bad master {master:?}"))?;
            let host = match host.as_str() {
                "" => asked_host.to_owned(),
                "?" => return Ok(None),
                _ => host,
            };
            Ok(Some(SlotRange {
                first,
                last,
                master: (host, port),
            }))
        })
        .collect();
    Ok(ranges?.into_iter().flatten().collect())
}

/// Where calls go now.
struct Routes {
    /// Slot → index in `queues`; `u16::MAX` for a slot no master serves.
    slots: Vec<u16>,
    queues: Vec<mpsc::UnboundedSender<Request>>,
    /// Master → index in `queues`, for redirections.
    by_address: HashMap<Address, usize>,
    /// Rung when a call finds no master for its slot: the map may be out of date.
    stale: Arc<Notify>,
}

fn lock_map<K, V>(map: &Mutex<HashMap<K, V>>) -> std::sync::MutexGuard<'_, HashMap<K, V>> {
    map.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A running writer for one master.
struct NodeWriter {
    queue: mpsc::UnboundedSender<Request>,
    stop: CancellationToken,
}

/// Where calls go.
struct State {
    routes: Option<Arc<Routes>>,
    /// Calls made before the first attempt to read the map finished, in call order; `None`
    /// after it.
    waiting: Option<Vec<(u16, Request)>>,
}

/// The cluster's writers and the slot map that routes calls to them.
pub(crate) struct Router {
    state: Mutex<State>,
    /// Rung by writers that met a sign of a changed map.
    stale: Arc<Notify>,
    /// The nodes the control pub/sub connection takes in turn: the masters of the last map,
    /// then the seeds.
    rotation: Arc<Rotation>,
    /// The pub/sub connections to the masters, which follow the map too.
    shards: Arc<Shards>,
    /// Shared with the writers: the calls Redis redirected (`MOVED`, `ASK`, `TRYAGAIN`),
    /// until they are sent on.
    pub(crate) redirections: Arc<Redirections>,
    /// For writers to masters a redirection names that the map does not list yet.
    template: NodeTemplate,
    health: Arc<Health>,
    cancel: CancellationToken,
    /// Those writers (a master importing its first slots), until a map lists their master.
    adhoc: Mutex<HashMap<Address, NodeWriter>>,
}

/// Calls Redis redirected, waiting to be sent on in the order they came.
///
/// While a slot has calls held here, new calls of that slot are held behind them
/// ([`Router::send`]), so that a call sent again never overtakes a later one of its channel
/// made meanwhile. (Only a call that was in flight when this node learnt a new map can still
/// be overtaken by one sent to the new master at once.)
#[derive(Default)]
pub(crate) struct Redirections {
    held: Mutex<Held>,
    /// Rung when the queue gets its first call.
    wake: Notify,
    pub(crate) moved: AtomicU64,
    pub(crate) asked: AtomicU64,
    pub(crate) tried_again: AtomicU64,
}

#[derive(Default)]
struct Held {
    queue: VecDeque<HeldCall>,
    per_slot: HashMap<u16, usize>,
    /// The engine is stopping: nothing is held any more.
    closed: bool,
}

impl HeldCall {
    /// Answers the caller: the engine stops, the call is not sent on.
    fn stopping(self) {
        let why = "the redis engine is stopping";
        let _ = self
            .request
            .reply
            .send(Err(LinkError::Disconnected(why.into())));
    }
}

struct HeldCall {
    /// Not sent on before this.
    due: tokio::time::Instant,
    request: Request,
    /// The master named by `MOVED` or `ASK`; else the call goes by its slot.
    to: Option<Address>,
}

impl Redirections {
    fn lock(&self) -> std::sync::MutexGuard<'_, Held> {
        self.held
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A call Redis redirected (the writer counted it in its route), from the writer of the
    /// master at `here`: held for the router, `TRYAGAIN` for [`RETRY_PAUSE`] (and, if it was
    /// sent after `ASKING`, to be sent to `here` again the same way: the map still names the
    /// master the slot leaves).
    pub(crate) fn push(&self, request: Request, redirect: Redirect, here: &Address) {
        let now = tokio::time::Instant::now();
        let (due, to, counter) = match redirect {
            Redirect::Moved(host, port) => (now, Some((host, port)), &self.moved),
            Redirect::Ask(host, port) => (now, Some((host, port)), &self.asked),
            Redirect::TryAgain => {
                let to = request.route.asking.then(|| here.clone());
                (now + RETRY_PAUSE, to, &self.tried_again)
            }
        };
        counter.fetch_add(1, Ordering::Relaxed);
        self.hold(HeldCall { due, request, to });
    }

    fn hold(&self, call: HeldCall) {
        let mut held = self.lock();
        if held.closed {
            drop(held);
            call.stopping();
            return;
        }
        let was_empty = held.queue.is_empty();
        *held.per_slot.entry(call.request.route.slot).or_default() += 1;
        held.queue.push_back(call);
        drop(held);
        if was_empty {
            self.wake.notify_one();
        }
    }

    /// A new call of `slot`: held behind the slot's held calls, if it has any.
    fn behind(&self, slot: u16, request: Request) -> Option<Request> {
        let mut held = self.lock();
        let Some(count) = held.per_slot.get_mut(&slot) else {
            return Some(request); // none held (or the engine is stopping)
        };
        *count += 1;
        held.queue.push_back(HeldCall {
            due: tokio::time::Instant::now(),
            request,
            to: None,
        });
        None
    }

    /// The held calls due now, in order; and when the next one is due. They still count as
    /// held (their slot's new calls wait) until [`Redirections::sent`].
    fn take_due(&self, into: &mut Vec<HeldCall>) -> Option<tokio::time::Instant> {
        let now = tokio::time::Instant::now();
        let mut held = self.lock();
        while held.queue.front().is_some_and(|call| call.due <= now) {
            into.push(held.queue.pop_front().expect("a front"));
        }
        held.queue.front().map(|call| call.due)
    }

    /// A call of `slot` taken by [`Redirections::take_due`] was queued on a writer: the
    /// slot's new calls need not wait for it any more.
    fn sent(&self, slot: u16) {
        let mut held = self.lock();
        if let std::collections::hash_map::Entry::Occupied(mut count) = held.per_slot.entry(slot) {
            *count.get_mut() -= 1;
            if *count.get() == 0 {
                count.remove();
            }
        }
    }

    /// Shutdown: every held call fails, and new ones are no longer held.
    fn close(&self) {
        let mut held = self.lock();
        held.closed = true;
        held.per_slot.clear();
        let calls = std::mem::take(&mut held.queue);
        drop(held);
        for call in calls {
            call.stopping();
        }
    }
}

impl Routes {
    /// Queues `request` on the writer of `slot`'s master, or answers it at once.
    fn send(&self, slot: u16, request: Request) {
        let node = self.slots[usize::from(slot)];
        let unsent = match self.queues.get(usize::from(node)) {
            Some(queue) => match queue.send(request) {
                Ok(()) => return,
                // The master left the map a moment ago and its writer stopped.
                Err(unsent) => (
                    unsent.0,
                    "the redis cluster's master of this channel is gone",
                ),
            },
            None => {
                self.stale.notify_one();
                (
                    request,
                    "no master of the redis cluster serves this channel's slot",
                )
            }
        };
        let (request, why) = unsent;
        let _ = request.reply.send(Err(LinkError::Disconnected(why.into())));
    }
}

/// What a connection to one node needs: the URL's credentials and TLS, and the certificates.
#[derive(Clone)]
pub(crate) struct NodeTemplate {
    pub info: ConnectionInfo,
    pub tls: Option<TlsCertificates>,
}

impl NodeTemplate {
    /// A client for the node at `host:port`.
    pub(crate) fn client(&self, host: &str, port: u16) -> redis::RedisResult<Client> {
        let addr = match self.info.addr() {
            ConnectionAddr::TcpTls {
                insecure,
                tls_params,
                ..
            } => ConnectionAddr::TcpTls {
                host: host.to_owned(),
                port,
                insecure: *insecure,
                tls_params: tls_params.clone(),
            },
            _ => ConnectionAddr::Tcp(host.to_owned(), port),
        };
        let info = self.info.clone().set_addr(addr);
        match &self.tls {
            Some(tls) => Client::build_with_tls(info, tls.clone()),
            None => Client::open(info),
        }
    }
}

impl Router {
    /// Starts the map's upkeep on the current Tokio runtime. `seeds` are `host:port` addresses
    /// of cluster nodes; `health` counts one writer down until the first map is known.
    pub(crate) fn start(
        template: NodeTemplate,
        seeds: Vec<Address>,
        rotation: Arc<Rotation>,
        shards: Arc<Shards>,
        health: Arc<Health>,
        cancel: &CancellationToken,
    ) -> Arc<Router> {
        let router = Arc::new(Router {
            state: Mutex::new(State {
                routes: None,
                waiting: Some(Vec::new()),
            }),
            stale: shards.stale.clone(),
            rotation,
            shards,
            redirections: Arc::default(),
            template: template.clone(),
            health: health.clone(),
            cancel: cancel.clone(),
            adhoc: Mutex::default(),
        });
        tokio::spawn(
            router
                .clone()
                .upkeep(template, seeds, health, cancel.clone()),
        );
        tokio::spawn(router.clone().follow(cancel.clone()));
        router
    }

    /// Sends on the calls Redis redirected as they fall due, in order, until `cancel`.
    async fn follow(self: Arc<Self>, cancel: CancellationToken) {
        let mut due = Vec::new();
        loop {
            let next = self.redirections.take_due(&mut due);
            for call in due.drain(..) {
                let slot = call.request.route.slot;
                self.send_on(call);
                self.redirections.sent(slot);
            }
            let sleep = async {
                match next {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = cancel.cancelled() => break,
                () = self.redirections.wake.notified() => {}
                () = sleep => {}
            }
        }
        self.redirections.close();
        for writer in lock_map(&self.adhoc).values() {
            writer.stop.cancel();
        }
    }

    /// A held call: to the master `MOVED` or `ASK` named (a writer of its own if the map does
    /// not list it yet), else by its slot, as the map says now.
    fn send_on(&self, call: HeldCall) {
        let HeldCall {
            mut request, to, ..
        } = call;
        let routes = self.lock().routes.clone();
        let Some(routes) = routes else {
            let why = "the redis cluster's slot map is not known";
            let _ = request.reply.send(Err(LinkError::Disconnected(why.into())));
            return;
        };
        let Some(address) = to else {
            request.route.asking = false;
            return routes.send(request.route.slot, request);
        };
        let queue = match routes.by_address.get(&address) {
            Some(&i) => routes.queues[i].clone(),
            None => match self.adhoc_writer(&address) {
                Some(queue) => queue,
                None => {
                    request.route.asking = false;
                    return routes.send(request.route.slot, request);
                }
            },
        };
        if let Err(unsent) = queue.send(request) {
            let why = "the redis cluster master a call was redirected to is gone";
            let _ = unsent
                .0
                .reply
                .send(Err(LinkError::Disconnected(why.into())));
        }
    }

    /// The queue of a writer to `address`, a master the map does not list (yet): started
    /// now if there is none.
    fn adhoc_writer(&self, address: &Address) -> Option<mpsc::UnboundedSender<Request>> {
        // Under this lock, which `install` holds while it adopts these writers and publishes
        // its routes: a map that lists the master now has its writer.
        let mut adhoc = lock_map(&self.adhoc);
        if let Some(writer) = adhoc.get(address) {
            return Some(writer.queue.clone());
        }
        if let Some(routes) = &self.lock().routes {
            if let Some(&i) = routes.by_address.get(address) {
                return Some(routes.queues[i].clone());
            }
        }
        // Not counted in readiness: a redirection may name a master that is gone.
        let writer = self.start_writer(address, &Arc::new(Health::new(0, 0)))?;
        let queue = writer.queue.clone();
        adhoc.insert(address.clone(), writer);
        Some(queue)
    }

    /// A writer for the master at `address` (`None` if no client can be made for it),
    /// counted down in `health` until it connects.
    fn start_writer(&self, address: &Address, health: &Arc<Health>) -> Option<NodeWriter> {
        let name: Arc<str> = format!("{}:{}", address.0, address.1).into();
        let client = match self.template.client(&address.0, address.1) {
            Ok(client) => client,
            Err(error) => {
                tracing::warn!(node = %name, %error, "cannot connect to a redis cluster master");
                return None;
            }
        };
        let stop = self.cancel.child_token();
        let (queue, requests) = mpsc::unbounded_channel();
        health.writers_down.fetch_add(1, Ordering::AcqRel);
        let writer = Writer::new(
            name,
            Source::direct(client),
            health.clone(),
            Some(ClusterLink {
                stale_map: self.stale.clone(),
                redirections: self.redirections.clone(),
                address: address.clone(),
            }),
        );
        tokio::spawn(writer.run(requests, stop.clone()));
        Some(NodeWriter { queue, stop })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Queues `request` now on the writer of `channel`'s master; before the first map is
    /// read, keeps it (in order) for then.
    pub(crate) fn send(&self, channel: &str, request: Request) {
        if channel.starts_with('}') {
            // Its keys would have no hash tag and land in different slots.
            let why = "a channel whose name starts with '}' cannot be kept in redis cluster";
            let _ = request.reply.send(Err(LinkError::Reply(why.into())));
            return;
        }
        let slot = channel_slot(channel);
        let mut request = request;
        request.route.slot = slot;
        // Behind the calls of its slot being sent on, if any (in order).
        let Some(request) = self.redirections.behind(slot, request) else {
            return;
        };
        let mut state = self.lock();
        if let Some(routes) = &state.routes {
            return routes.send(slot, request);
        }
        match &mut state.waiting {
            Some(waiting) => waiting.push((slot, request)),
            None => {
                let why = "the redis cluster's slot map could not be read";
                let _ = request.reply.send(Err(LinkError::Disconnected(why.into())));
            }
        }
    }

    /// The first attempt to read the map failed: the calls kept for it fail with `error`.
    fn first_attempt_failed(&self, error: &str) {
        let waiting = self.lock().waiting.take();
        for (_, request) in waiting.into_iter().flatten() {
            let _ = request
                .reply
                .send(Err(LinkError::Disconnected(error.into())));
        }
    }

    async fn upkeep(
        self: Arc<Self>,
        template: NodeTemplate,
        seeds: Vec<Address>,
        health: Arc<Health>,
        cancel: CancellationToken,
    ) {
        let mut writers: HashMap<Address, NodeWriter> = HashMap::new();
        let mut backoff = Backoff::default();
        let mut known = false;
        let mut link: MapLink = None;
        loop {
            // Ask the masters we know first, then the seeds.
            let mut candidates: Vec<Address> = writers.keys().cloned().collect();
            candidates.extend(
                seeds
                    .iter()
                    .filter(|seed| !writers.contains_key(*seed))
                    .cloned(),
            );
            let map = tokio::select! {
                _ = cancel.cancelled() => break,
                map = fetch_slots(&template, &candidates, &mut link) => map,
            };
            let wait = match map {
                Ok(ranges) => {
                    backoff.reset();
                    self.install(&ranges, &template, &seeds, &mut writers, &cancel);
                    if !known {
                        known = true;
                        health.writers_down.fetch_sub(1, Ordering::AcqRel);
                        tracing::info!(masters = writers.len(), "redis cluster slot map known");
                    }
                    REFRESH
                }
                Err(error) => {
                    backoff.failed();
                    tracing::warn!(%error, "cannot read the redis cluster's slot map");
                    self.first_attempt_failed(&error);
                    backoff
                        .next_attempt()
                        .saturating_duration_since(tokio::time::Instant::now())
                }
            };
            tokio::select! {
                _ = cancel.cancelled() => break,
                () = tokio::time::sleep(wait) => {}
                () = self.stale.notified() => {
                    tokio::time::sleep(MIN_REFRESH_GAP).await;
                }
            }
        }
        for writer in writers.values() {
            writer.stop.cancel();
        }
    }

    /// Routes calls by `ranges`: starts writers for new masters, stops those of masters gone,
    /// then sends the calls kept for the first map (in call order, before any later call).
    fn install(
        &self,
        ranges: &[SlotRange],
        template: &NodeTemplate,
        seeds: &[Address],
        writers: &mut HashMap<Address, NodeWriter>,
        cancel: &CancellationToken,
    ) {
        let mut masters: Vec<Address> = ranges.iter().map(|range| range.master.clone()).collect();
        masters.sort();
        masters.dedup();
        writers.retain(|address, writer| {
            let keep = masters.contains(address);
            if !keep {
                tracing::info!(node = %format!("{}:{}", address.0, address.1), "redis cluster master left the slot map");
                writer.stop.cancel();
            }
            keep
        });
        let mut slots = vec![u16::MAX; SLOTS];
        let mut queues = Vec::with_capacity(masters.len());
        let mut served = Vec::with_capacity(masters.len());
        // Held until the routes are published (see `adhoc_writer`).
        let mut adhoc = lock_map(&self.adhoc);
        for master in &masters {
            if !writers.contains_key(master) {
                // A writer started for a redirection to this master (still not counted in
                // readiness: the master's pub/sub connection is), or a new one.
                let writer = adhoc.remove(master);
                let Some(writer) = writer.or_else(|| self.start_writer(master, &self.health))
                else {
                    // A bad address from the cluster itself: its slots fail as unavailable
                    // (and ask for the map again) until the map changes.
                    continue;
                };
                writers.insert(master.clone(), writer);
            }
            let index = queues.len() as u16;
            queues.push(writers[master].queue.clone());
            served.push(master.clone());
            for range in ranges.iter().filter(|range| &range.master == master) {
                slots[usize::from(range.first)..=usize::from(range.last)].fill(index);
            }
        }
        let mut rotation: Vec<Client> = Vec::new();
        for (host, port) in masters
            .iter()
            .chain(seeds.iter().filter(|seed| !masters.contains(seed)))
        {
            if let Ok(client) = template.client(host, *port) {
                rotation.push(client);
            }
        }
        self.rotation.set(rotation);
        self.shards.install(&served, &slots, template, cancel);
        let by_address = served
            .iter()
            .enumerate()
            .map(|(i, address)| (address.clone(), i))
            .collect();
        let routes = Arc::new(Routes {
            slots,
            queues,
            by_address,
            stale: self.stale.clone(),
        });
        let mut state = self.lock();
        state.routes = Some(routes.clone());
        for (slot, request) in state.waiting.take().into_iter().flatten() {
            // A caller that gave up (its timeout) is not written for.
            if !request.reply.is_closed() {
                routes.send(slot, request);
            }
        }
    }
}

/// A connection whose listing a new map changed: the channels to settle, and whether it took
/// some over from another connection.
type Changed = (Arc<Subscriber>, Vec<Arc<str>>, bool);

/// With Redis Cluster: one pub/sub connection per master, each subscribed to the channels
/// whose slots that master holds.
pub(crate) struct Shards {
    prefix: Arc<str>,
    deliver: Arc<dyn Deliver>,
    health: Arc<Health>,
    /// Notified after every (re)connection of any of them (presence is refreshed then).
    connected: Arc<Notify>,
    timeout: Duration,
    state: Mutex<ShardState>,
    /// Whether a map was installed: `watch` waits for the first.
    mapped: watch::Sender<bool>,
    /// Sharded pub/sub (`SSUBSCRIBE`) on the masters' connections.
    sharded: bool,
    /// Rung when something says the map changed (the router reads it again).
    pub(crate) stale: Arc<Notify>,
}

#[derive(Default)]
struct ShardState {
    /// Slot → index in `subscribers`; `u16::MAX` for a slot no master serves.
    slots: Vec<u16>,
    subscribers: Vec<Arc<Subscriber>>,
    by_address: HashMap<Address, (Arc<Subscriber>, CancellationToken)>,
    /// Every channel the hub watches, and the connection that lists it (none while no master
    /// serves its slot). Only this lock changes a channel's listing on the connections (the
    /// lock order is this, then a subscriber's).
    watched: HashMap<Arc<str>, Option<Arc<Subscriber>>>,
}

impl ShardState {
    fn subscriber_of(&self, channel: &str) -> Option<Arc<Subscriber>> {
        let index = *self.slots.get(usize::from(channel_slot(channel)))?;
        self.subscribers.get(usize::from(index)).cloned()
    }
}

impl Shards {
    pub(crate) fn new(
        prefix: &str,
        deliver: Arc<dyn Deliver>,
        health: Arc<Health>,
        connected: Arc<Notify>,
        timeout: Duration,
        sharded: bool,
    ) -> Arc<Shards> {
        Arc::new(Shards {
            prefix: prefix.into(),
            deliver,
            health,
            connected,
            timeout,
            state: Mutex::new(ShardState::default()),
            mapped: watch::channel(false).0,
            sharded,
            stale: Arc::new(Notify::new()),
        })
    }

    /// Whether the masters' connections use sharded pub/sub.
    pub(crate) fn sharded(&self) -> bool {
        self.sharded
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ShardState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn subscriber_of(&self, channel: &str) -> Option<Arc<Subscriber>> {
        ShardState::subscriber_of(&self.lock(), channel)
    }

    /// Stops watching `channel`: unlisted (under the lock, so no concurrent `watch` or map
    /// lists it meanwhile) from the connection returned, which must then settle it.
    fn forget(&self, channel: &str) -> Option<Arc<Subscriber>> {
        let mut state = self.lock();
        let holder = state.watched.remove(channel).flatten()?;
        holder.unlist(channel);
        Some(holder)
    }

    /// Subscribes to (or unsubscribes from) a channel's publications on its master (waiting
    /// for the first map at most `timeout`).
    pub(crate) async fn watch(
        &self,
        channel: &str,
        watching: bool,
        timeout: Duration,
    ) -> Result<(), LinkError> {
        if !watching {
            if let Some(holder) = self.forget(channel) {
                holder.settle(channel, timeout).await?;
            }
            return Ok(());
        }
        if channel.starts_with('}') {
            // As for its keys (`Router::send`): its pub/sub channel would not be in its slot.
            let why = "a channel whose name starts with '}' cannot be kept in redis cluster";
            return Err(LinkError::Reply(why.into()));
        }
        let mut mapped = self.mapped.subscribe();
        let _ = tokio::time::timeout(timeout, mapped.wait_for(|mapped| *mapped)).await;
        let channel: Arc<str> = channel.into();
        let (holder, listed_now) = {
            let mut state = self.lock();
            let holder = ShardState::subscriber_of(&state, &channel);
            let listed_now = !state.watched.contains_key(&channel);
            if let Some(holder) = &holder {
                holder.list(&channel, false);
            }
            state.watched.insert(channel.clone(), holder.clone());
            (holder, listed_now)
        };
        let result = match holder {
            None => Err(LinkError::Disconnected(
                "no master of the redis cluster serves this channel's slot".into(),
            )),
            Some(holder) => match holder.started(timeout).await {
                Ok(()) => holder.subscribe_listed(&channel, timeout).await,
                Err(error) => Err(error),
            },
        };
        if result.is_err() && listed_now {
            // The hub gives up on the channel: list it nowhere.
            if let Some(holder) = self.forget(&channel) {
                let _ = holder.settle(&channel, timeout).await;
            }
        }
        result
    }

    /// See `Subscriber::delivery_of`.
    pub(crate) fn delivery_of(&self, channel: &str, offset: u64) -> Option<oneshot::Receiver<()>> {
        self.subscriber_of(channel)?.delivery_of(channel, offset)
    }

    /// Follows a new map: `masters[i]` serves the slots whose entry in `slots` is `i`. Starts
    /// connections to new masters, moves channels whose master changed, stops the connections
    /// of masters gone.
    fn install(
        &self,
        masters: &[Address],
        slots: &[u16],
        template: &NodeTemplate,
        cancel: &CancellationToken,
    ) {
        // Connections whose listing changed, with the channels to settle and whether they
        // took channels over.
        let mut changed: HashMap<*const Subscriber, Changed> = HashMap::new();
        let mut note = |subscriber: &Arc<Subscriber>, channel: &Arc<str>, took_over: bool| {
            let entry = changed
                .entry(Arc::as_ptr(subscriber))
                .or_insert_with(|| (subscriber.clone(), Vec::new(), false));
            entry.1.push(channel.clone());
            entry.2 |= took_over;
        };
        {
            let mut state = self.lock();
            let state = &mut *state;
            // A connection started after the first map takes channels over from another.
            let takes_over = !state.slots.is_empty();
            let mut index_of = vec![u16::MAX; masters.len()];
            let mut subscribers = Vec::with_capacity(masters.len());
            for (i, master) in masters.iter().enumerate() {
                if !state.by_address.contains_key(master) {
                    let Ok(client) = template.client(&master.0, master.1) else {
                        continue;
                    };
                    let stop = cancel.child_token();
                    self.health.subscribers_down.fetch_add(1, Ordering::AcqRel);
                    let subscriber = Subscriber::start(
                        &Source::direct(client),
                        &self.prefix,
                        self.deliver.clone(),
                        self.health.clone(),
                        self.connected.clone(),
                        &stop,
                        Role {
                            control: false,
                            takes_over,
                            sharded: self.sharded,
                        },
                        Some(self.stale.clone()),
                    );
                    state.by_address.insert(master.clone(), (subscriber, stop));
                }
                index_of[i] = subscribers.len() as u16;
                subscribers.push(state.by_address[master].0.clone());
            }
            state.slots = slots
                .iter()
                .map(|&master| {
                    index_of
                        .get(usize::from(master))
                        .copied()
                        .unwrap_or(u16::MAX)
                })
                .collect();
            state.subscribers = subscribers;
            let mut moves = Vec::new();
            for (channel, before) in &state.watched {
                let after = state.subscriber_of(channel);
                let same = match (before, &after) {
                    (Some(before), Some(after)) => Arc::ptr_eq(before, after),
                    (None, None) => true,
                    _ => false,
                };
                if !same {
                    moves.push((channel.clone(), before.clone(), after));
                }
            }
            for (channel, before, after) in moves {
                if let Some(before) = &before {
                    before.unlist(&channel);
                    note(before, &channel, false);
                }
                if let Some(after) = &after {
                    after.list(&channel, true);
                    note(after, &channel, true);
                }
                state.watched.insert(channel, after);
            }
            state.by_address.retain(|address, (_, stop)| {
                let keep = masters.contains(address);
                if !keep {
                    stop.cancel();
                }
                keep
            });
        }
        self.mapped.send_replace(true);
        let timeout = self.timeout;
        for (_, (subscriber, channels, took_over)) in changed {
            if took_over {
                tracing::info!(
                    channels = channels.len(),
                    "redis cluster: channels moved to another master"
                );
            }
            let deliver = self.deliver.clone();
            tokio::spawn(async move {
                let mut settled = true;
                for channel in &channels {
                    settled &= subscriber.settle(channel, timeout).await.is_ok();
                }
                if took_over {
                    if settled && subscriber.connected() {
                        subscriber.took_over(&*deliver);
                    } else {
                        // Its next connection subscribes them, then says so.
                        subscriber.owe_interrupt();
                    }
                }
            });
        }
    }
}

/// The connection the slot map is read on, kept from one reading to the next.
type MapLink = Option<(Address, MultiplexedConnection)>;

/// `CLUSTER SLOTS` through `link` if it still goes to one of `candidates`, else from the first
/// of them that answers (which `link` then keeps).
async fn fetch_slots(
    template: &NodeTemplate,
    candidates: &[Address],
    link: &mut MapLink,
) -> Result<Vec<SlotRange>, String> {
    async fn ask(
        connection: &mut MultiplexedConnection,
        host: &str,
    ) -> Result<Vec<SlotRange>, String> {
        let reply: Value = redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query_async(connection)
            .await
            .map_err(|error| error.to_string())?;
        let ranges = parse_slots(&reply, host)?;
        if ranges.is_empty() {
            return Err("no slots are assigned".to_owned());
        }
        Ok(ranges)
    }
    let mut errors = Vec::new();
    if let Some((address, mut connection)) = link.take() {
        if candidates.contains(&address) {
            match tokio::time::timeout(CONNECT_TIMEOUT, ask(&mut connection, &address.0)).await {
                Ok(Ok(ranges)) => {
                    *link = Some((address, connection));
                    return Ok(ranges);
                }
                Ok(Err(error)) => errors.push(format!("{}:{}: {error}", address.0, address.1)),
                Err(_) => errors.push(format!(
                    "{}:{}: no answer within {CONNECT_TIMEOUT:?}",
                    address.0, address.1
                )),
            }
        }
    }
    for (host, port) in candidates {
        let attempt = async {
            let client = template
                .client(host, *port)
                .map_err(|error| error.to_string())?;
            let mut connection = client
                .get_multiplexed_async_connection()
                .await
                .map_err(|error| error.to_string())?;
            let ranges = ask(&mut connection, host).await?;
            Ok::<_, String>((ranges, connection))
        };
        match tokio::time::timeout(CONNECT_TIMEOUT, attempt).await {
            Ok(Ok((ranges, connection))) => {
                *link = Some(((host.clone(), *port), connection));
                return Ok(ranges);
            }
            Ok(Err(error)) => errors.push(format!("{host}:{port}: {error}")),
            Err(_) => errors.push(format!(
                "{host}:{port}: no answer within {CONNECT_TIMEOUT:?}"
            )),
        }
    }
    Err(errors.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_as_redis_computes_them() {
        // Values from the Redis Cluster specification and `CLUSTER KEYSLOT`.
        assert_eq!(crc16(b"123456789"), 0x31c3);
        assert_eq!(key_slot(b"foo"), 12182);
        assert_eq!(key_slot(b"bar"), 5061);
        assert_eq!(key_slot(b"{user1000}.following"), key_slot(b"user1000"));
        assert_eq!(key_slot(b"{user1000}.followers"), key_slot(b"user1000"));
        // An empty tag hashes the whole key; only the first `{`…`}` counts.
        assert_eq!(key_slot(b"foo{}{bar}"), crc16(b"foo{}{bar}") % SLOTS as u16);
        assert_eq!(channel_slot("a}b"), key_slot(b"{a}b}"));
        assert_eq!(channel_slot("}ab"), key_slot(b"{}ab}"));
        assert_eq!(key_slot(b"foo{{bar}}zap"), key_slot(b"{bar"));
        assert_eq!(key_slot(b"foo{bar}{zap}"), key_slot(b"bar"));
        assert_eq!(
            channel_slot("chat:lobby"),
            key_slot(b"plexus:stream:{chat:lobby}")
        );
        assert_eq!(
            channel_slot("chat:lobby"),
            key_slot(b"plexus:meta:{chat:lobby}")
        );
    }

    #[test]
    fn reads_cluster_slots() {
        let node = |host: &str, port: i64| {
            Value::Array(vec![
                Value::BulkString(host.as_bytes().to_vec()),
                Value::Int(port),
                Value::BulkString(b"id".to_vec()),
            ])
        };
        let reply = Value::Array(vec![
            Value::Array(vec![
                Value::Int(0),
                Value::Int(5460),
                node("10.0.0.1", 7000),
                node("10.0.0.4", 7003),
            ]),
            Value::Array(vec![Value::Int(5461), Value::Int(10000), node("", 7001)]),
            Value::Array(vec![
                Value::Int(10001),
                Value::Int(12000),
                Value::Array(vec![Value::Nil, Value::Int(7002)]),
            ]),
            Value::Array(vec![Value::Int(12001), Value::Int(16383), node("?", 7003)]),
        ]);
        assert_eq!(
            parse_slots(&reply, "seed").unwrap(),
            vec![
                SlotRange {
                    first: 0,
                    last: 5460,
                    master: ("10.0.0.1".into(), 7000)
                },
                SlotRange {
                    first: 5461,
                    last: 10000,
                    master: ("seed".into(), 7001)
                },
                SlotRange {
                    first: 10001,
                    last: 12000,
                    master: ("seed".into(), 7002)
                },
            ]
        );
        let bad = Value::Array(vec![Value::Array(vec![
            Value::Int(5),
            Value::Int(70000),
            node("h", 1),
        ])]);
        assert!(parse_slots(&bad, "seed").is_err());
        assert!(parse_slots(&Value::Nil, "seed").is_err());
    }
}
