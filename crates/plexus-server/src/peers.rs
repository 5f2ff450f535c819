//! The other nodes, as their heartbeats ([`NodeCommand::Stats`], every [`HEARTBEAT`] on the
//! engine's control channel) describe them, for `info`. A node silent for [`SILENT`] is gone.
//! [`listen`] takes every command from other nodes that is the server's to act on.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use plexus_core::{NodeCommand, NodeStats};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::Shared;

pub(crate) const HEARTBEAT: Duration = Duration::from_secs(5);
pub(crate) const SILENT: Duration = Duration::from_secs(15);

/// The last heartbeat of every node heard from (this one included).
pub(crate) struct Peers {
    nodes: Mutex<HashMap<Arc<str>, (NodeStats, Instant)>>,
    /// A node not known before spoke: answer at once so it learns of this one without waiting.
    newcomer: Notify,
}

impl Peers {
    pub(crate) fn new() -> Peers {
        Peers {
            nodes: Mutex::new(HashMap::new()),
            newcomer: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, (NodeStats, Instant)>> {
        self.nodes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Keeps a heartbeat.
    pub(crate) fn record(&self, stats: &NodeStats) {
        let known = self
            .lock()
            .insert(stats.node.clone(), (stats.clone(), Instant::now()))
            .is_some();
        if !known {
            self.newcomer.notify_one();
        }
    }

    /// The nodes heard from within [`SILENT`]; the others are forgotten.
    pub(crate) fn live(&self) -> Vec<NodeStats> {
        let mut nodes = self.lock();
        nodes.retain(|_, (_, heard)| heard.elapsed() <= SILENT);
        nodes.values().map(|(stats, _)| stats.clone()).collect()
    }
}

/// Acts on the commands the hub passes on: heartbeats are kept here, `/emulation` frames for
/// this node's sessions go to their streams, surveys are answered, and answers to this
/// node's surveys go to whoever asked.
pub(crate) fn listen(shared: &Arc<Shared>) {
    let frames = crate::emulation::serve_remote_frames(shared);
    let surveys = crate::survey::serve(shared);
    let node = shared.emulation.node().clone();
    let peers = shared.peers.clone();
    let asked = shared.surveys.clone();
    shared
        .node
        .hub()
        .on_other_commands(Arc::new(move |command: &NodeCommand| match command {
            NodeCommand::Emulation {
                node: target,
                session,
                data,
            } if *target == node => {
                let _ = frames.send((session.clone(), data.clone()));
            }
            NodeCommand::Stats(stats) => peers.record(stats),
            NodeCommand::Survey { .. } => {
                let _ = surveys.send(command.clone());
            }
            NodeCommand::SurveyReply { to, id, from, data } if *to == node => {
                asked.answered(*id, from.clone(), data.clone());
            }
            _ => {}
        }));
}

/// This node's counts.
pub(crate) fn local_stats(
    shared: &Shared,
    node: &Arc<str>,
    name: &Arc<str>,
    started: Instant,
) -> NodeStats {
    let hub = shared.node.hub();
    let channels = hub.channels();
    let mut users = HashSet::new();
    for (name, _) in &channels {
        users.extend(hub.presence(name).iter().map(|client| client.user.clone()));
    }
    let num_subs: usize = channels.iter().map(|(_, clients)| clients).sum();
    NodeStats {
        node: node.clone(),
        name: name.clone(),
        version: env!("CARGO_PKG_VERSION").into(),
        num_clients: hub.n_connections() as u32,
        num_users: users.len() as u32,
        num_channels: channels.len() as u32,
        num_subs: num_subs as u32,
        uptime: started.elapsed().as_secs(),
    }
}

/// Publishes this node's heartbeat every [`HEARTBEAT`] (and when a new node appears) until
/// shutdown.
pub(crate) fn heartbeat(shared: &Arc<Shared>, name: Arc<str>, started: Instant) {
    let weak = Arc::downgrade(shared);
    let shutdown = shared.shutdown.clone();
    let peers = shared.peers.clone();
    shared.tasks.spawn(async move {
        loop {
            let Some(shared) = weak.upgrade() else { return };
            let stats = local_stats(&shared, shared.emulation.node(), &name, started);
            if let Err(error) = shared.node.command(NodeCommand::Stats(stats)).await {
                tracing::debug!(%error, "cannot publish this node's heartbeat");
            }
            drop(shared);
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(HEARTBEAT) => {}
                () = peers.newcomer.notified() => {}
            }
        }
    });
}
