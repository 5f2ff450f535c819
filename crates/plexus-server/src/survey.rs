//! Questions for every node through the engine's control channel ([`NodeCommand::Survey`]),
//! which each node, this one included, answers ([`NodeCommand::SurveyReply`]): how the
//! `channels` API lists the channels of the whole cluster, not only this node's.
//!
//! A survey waits for an answer from every live node ([`crate::peers`]), at most [`TIMEOUT`];
//! a node that died since its last heartbeat only makes it wait that long.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use plexus_core::{EngineError, NodeCommand};
use tokio::sync::mpsc;

use crate::Shared;

/// The longest a survey waits for the last answer.
pub(crate) const TIMEOUT: Duration = Duration::from_secs(2);

/// The `op` of a survey for channels with subscribers; `data` is the glob pattern, the answer
/// a JSON object of channel names and subscriber counts.
pub(crate) const CHANNELS: &str = "channels";

type Answers = mpsc::UnboundedSender<(Arc<str>, Bytes)>;

/// This node's surveys waiting for answers.
#[derive(Default)]
pub(crate) struct Surveys {
    next_id: AtomicU64,
    pending: Mutex<HashMap<u64, Answers>>,
}

impl Surveys {
    fn pending(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Answers>> {
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Asks every node and returns each node's answer: as soon as every node of `nodes`
    /// answered, or what came within [`TIMEOUT`].
    pub(crate) async fn ask(
        &self,
        shared: &Shared,
        op: &str,
        data: Bytes,
        nodes: &HashSet<Arc<str>>,
    ) -> Result<HashMap<Arc<str>, Bytes>, EngineError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (answers_tx, mut answers_rx) = mpsc::unbounded_channel();
        self.pending().insert(id, answers_tx);
        // Forgotten however this ends (an error, the caller gone).
        let _forget = Forget { surveys: self, id };
        shared
            .node
            .command(NodeCommand::Survey {
                from: shared.emulation.node().clone(),
                id,
                op: op.into(),
                data,
            })
            .await?;
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        let mut answers = HashMap::new();
        let mut waiting: HashSet<&Arc<str>> = nodes.iter().collect();
        while !waiting.is_empty() {
            match tokio::time::timeout_at(deadline, answers_rx.recv()).await {
                Ok(Some((node, answer))) => {
                    waiting.remove(&node);
                    answers.insert(node, answer);
                }
                Ok(None) | Err(_) => {
                    let missing: Vec<&str> = waiting.iter().map(|node| &***node).collect();
                    tracing::warn!(op, ?missing, "survey: not every node answered in time");
                    break;
                }
            }
        }
        Ok(answers)
    }

    /// An answer to one of this node's surveys.
    pub(crate) fn answered(&self, id: u64, from: Arc<str>, data: Bytes) {
        if let Some(answers) = self.pending().get(&id) {
            let _ = answers.send((from, data));
        }
    }
}

struct Forget<'a> {
    surveys: &'a Surveys,
    id: u64,
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        self.surveys.pending().remove(&self.id);
    }
}

/// Answers the surveys of every node (from one task, in arrival order): returns where to send
/// them.
pub(crate) fn serve(shared: &Arc<Shared>) -> mpsc::UnboundedSender<NodeCommand> {
    let (surveys_tx, mut surveys) = mpsc::unbounded_channel::<NodeCommand>();
    let weak = Arc::downgrade(shared);
    let shutdown = shared.shutdown.clone();
    shared.tasks.spawn(async move {
        loop {
            let survey = tokio::select! {
                () = shutdown.cancelled() => return,
                survey = surveys.recv() => match survey {
                    Some(survey) => survey,
                    None => return,
                },
            };
            let NodeCommand::Survey { from, id, op, data } = survey else {
                continue;
            };
            let Some(shared) = weak.upgrade() else { return };
            let answer = match &*op {
                CHANNELS => {
                    let pattern = String::from_utf8_lossy(&data);
                    let channels = crate::api::local_channels(&shared, &pattern);
                    Bytes::from(serde_json::to_vec(&channels).expect("a map of counts encodes"))
                }
                // From a newer node: it gets no answer from this one.
                _ => continue,
            };
            let reply = NodeCommand::SurveyReply {
                to: from,
                id,
                from: shared.emulation.node().clone(),
                data: answer,
            };
            if let Err(error) = shared.node.command(reply).await {
                tracing::debug!(%error, "survey: cannot answer");
            }
        }
    });
    surveys_tx
}
