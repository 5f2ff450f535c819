//! Writers: one task per shard of channels, as in the Redis engine.
//!
//! A call hashes its channel to a shard and queues its operation on that shard's unbounded
//! queue *in the call*, so the operations of one channel run in call order. The shard's task
//! takes every queued operation (up to [`MAX_BATCH`]), groups them by channel, and runs each
//! channel's operations one after another while different channels run concurrently; then
//! the next batch.
//!
//! Each shard keeps the last known [`ChannelState`] of the channels it wrote to, so a publish
//! is normally one JetStream append; an append that finds another node appended meanwhile
//! reloads the state and tries again. The cache is dropped on every reconnection.
//!
//! While NATS is not usable (disconnected, or the streams not set up yet) every operation is
//! answered at once with an error; after an operation of a channel fails, the rest of that
//! channel's batch fails with it, so callers never wait long.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::join_all;
use plexus_core::{HistoryRetention, StreamPosition};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::codec;
use crate::store::{AppendError, ChannelState, LinkError, Store};

/// Operations taken in one batch at most.
pub const MAX_BATCH: usize = 256;
/// Longest run of one operation (a publish may take a few requests).
pub const OPERATION_TIMEOUT: Duration = Duration::from_secs(4);
/// Appends tried at most for one publish when other nodes keep appending first.
const MAX_ATTEMPTS: usize = 32;
/// Channel states cached per shard at most (beyond, the cache starts over).
const MAX_CACHED: usize = 16_384;

/// What a writer does for a channel.
pub enum Operation {
    /// Appends (with retention) and delivers the publication (`Publication::to_stored`).
    Publish {
        stored: Bytes,
        retention: Option<HistoryRetention>,
    },
    /// Publishes an envelope on the channel's core subject.
    Core {
        envelope: Bytes,
    },
    RemoveHistory,
    AddPresence {
        client: Arc<str>,
        descriptor: Bytes,
    },
    RemovePresence {
        client: Arc<str>,
    },
}

pub type Reply = Result<Option<StreamPosition>, LinkError>;

struct Request {
    channel: Arc<str>,
    operation: Operation,
    reply: oneshot::Sender<Reply>,
}

/// The queues of the shard writers.
pub struct Writers {
    queues: Vec<mpsc::UnboundedSender<Request>>,
}

impl Writers {
    /// Starts `shards` writer tasks on the current Tokio runtime.
    pub fn start(store: Arc<Store>, shards: usize, cancel: &CancellationToken) -> Writers {
        let queues = (0..shards.max(1))
            .map(|_| {
                let (queue, requests) = mpsc::unbounded_channel();
                tokio::spawn(run(store.clone(), requests, cancel.clone()));
                queue
            })
            .collect();
        Writers { queues }
    }

    /// Queues `operation` now on the shard of `channel`; the receiver gets its outcome (or
    /// `Err` if the writer is gone).
    pub fn send(&self, channel: &str, operation: Operation) -> Option<oneshot::Receiver<Reply>> {
        let mut hasher = std::hash::DefaultHasher::new();
        channel.hash(&mut hasher);
        let shard = (hasher.finish() % self.queues.len() as u64) as usize;
        let (reply, receiver) = oneshot::channel();
        self.queues[shard]
            .send(Request {
                channel: channel.into(),
                operation,
                reply,
            })
            .ok()?;
        Some(receiver)
    }
}

async fn run(
    store: Arc<Store>,
    mut requests: mpsc::UnboundedReceiver<Request>,
    cancel: CancellationToken,
) {
    let mut cache: HashMap<Arc<str>, ChannelState> = HashMap::new();
    let mut generation = store.generation();
    let mut batch = Vec::with_capacity(MAX_BATCH);
    loop {
        let first = tokio::select! {
            _ = cancel.cancelled() => return,
            request = requests.recv() => match request {
                Some(request) => request,
                None => return, // the engine is gone
            },
        };
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match requests.try_recv() {
                Ok(request) => batch.push(request),
                Err(_) => break,
            }
        }
        if store.generation() != generation || cache.len() > MAX_CACHED {
            cache.clear();
            generation = store.generation();
        }
        if let Err(error) = store.usable_soon().await {
            for request in batch.drain(..) {
                let _ = request.reply.send(Err(error.clone()));
            }
            continue;
        }
        // Group by channel, keeping each channel's order.
        let mut groups: Vec<(Arc<str>, Vec<Request>)> = Vec::new();
        let mut index: HashMap<Arc<str>, usize> = HashMap::new();
        for request in batch.drain(..) {
            match index.get(&request.channel) {
                Some(&at) => groups[at].1.push(request),
                None => {
                    index.insert(request.channel.clone(), groups.len());
                    groups.push((request.channel.clone(), vec![request]));
                }
            }
        }
        let runs = groups.into_iter().map(|(channel, requests)| {
            let state = cache.remove(&channel);
            run_channel(&store, channel, state, requests)
        });
        tokio::select! {
            _ = cancel.cancelled() => return,
            states = join_all(runs) => {
                for (channel, state) in states {
                    if let Some(state) = state {
                        cache.insert(channel, state);
                    }
                }
            }
        }
    }
}

/// Runs one channel's operations in order; returns the state to cache.
async fn run_channel(
    store: &Arc<Store>,
    channel: Arc<str>,
    mut state: Option<ChannelState>,
    requests: Vec<Request>,
) -> (Arc<str>, Option<ChannelState>) {
    let mut failed: Option<LinkError> = None;
    for request in requests {
        if let Some(error) = &failed {
            let _ = request.reply.send(Err(error.clone()));
            continue;
        }
        let run = execute(store, &channel, &mut state, request.operation);
        let result = match tokio::time::timeout(OPERATION_TIMEOUT, run).await {
            Ok(result) => result,
            Err(_) => Err(LinkError::Timeout(OPERATION_TIMEOUT)),
        };
        if let Err(error) = &result {
            // What NATS did is unknown: start from its state next time.
            state = None;
            failed = Some(error.clone());
        }
        let _ = request.reply.send(result);
    }
    (channel, state)
}

async fn execute(
    store: &Arc<Store>,
    channel: &str,
    state: &mut Option<ChannelState>,
    operation: Operation,
) -> Reply {
    match operation {
        Operation::Publish {
            stored,
            retention: None,
        } => {
            let envelope = codec::publication_envelope(0, &stored);
            store
                .publish_core(store.names.pub_subject(channel), None, envelope)
                .await?;
            Ok(None)
        }
        Operation::Publish {
            stored,
            retention: Some(retention),
        } => publish(store, channel, state, stored, retention)
            .await
            .map(Some),
        Operation::Core { envelope } => {
            store
                .publish_core(store.names.pub_subject(channel), None, envelope)
                .await?;
            Ok(None)
        }
        Operation::RemoveHistory => {
            *state = Some(store.remove_history(channel).await?);
            Ok(None)
        }
        Operation::AddPresence { client, descriptor } => {
            store.add_presence(channel, &client, descriptor).await?;
            Ok(None)
        }
        Operation::RemovePresence { client } => {
            store.remove_presence(channel, &client).await?;
            Ok(None)
        }
    }
}

/// Appends as the channel's next offset (retrying while other nodes append first), then
/// delivers on the core subject.
async fn publish(
    store: &Arc<Store>,
    channel: &str,
    state: &mut Option<ChannelState>,
    stored: Bytes,
    retention: HistoryRetention,
) -> Result<StreamPosition, LinkError> {
    let mut set_up_again = false;
    for _ in 0..MAX_ATTEMPTS {
        let current = match state {
            Some(current) => current,
            None => state.insert(store.load_state(channel).await?),
        };
        match store.append(channel, current, &stored, retention).await {
            Ok(last) => {
                let offset = last.offset;
                let keep = last.keep;
                current.last = Some(last);
                store.mark_started(channel, current).await;
                let epoch = current.meta.epoch.clone();
                let envelope = codec::publication_envelope(offset, &stored);
                if let Err(error) = store
                    .publish_core(store.names.pub_subject(channel), Some(&epoch), envelope)
                    .await
                {
                    // Stored all the same: other nodes fill the gap from history.
                    tracing::warn!(channel, %error, "could not deliver a stored publication");
                }
                store.trim(channel, offset, keep);
                return Ok(StreamPosition { offset, epoch });
            }
            Err(AppendError::Conflict) => *state = None,
            Err(AppendError::NoStream) if !set_up_again => {
                *state = None;
                set_up_again = true;
                store.setup().await?;
            }
            Err(AppendError::NoStream) => {
                return Err(LinkError::Failed("the history stream is missing".into()))
            }
            Err(AppendError::Link(error)) => return Err(error),
        }
    }
    Err(LinkError::Contention)
}
