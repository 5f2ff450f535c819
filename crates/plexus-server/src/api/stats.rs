//! `channels` and `info`: this node's view (the hub's channels and connections).

use std::collections::BTreeMap;
use std::sync::Arc;

use plexus_core::NodeStats;

use plexus_protocol::client::ErrorCode;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::Validate;
use crate::Shared;

/// Who this node is, for `info`: an id made at start, a name, and the start time.
pub(super) struct NodeIdentity {
    uid: String,
    name: String,
    started: Instant,
}

impl NodeIdentity {
    /// `uid`: the node's id, the one its SSE and HTTP-streaming sessions report.
    pub(super) fn new(uid: String) -> NodeIdentity {
        NodeIdentity {
            uid,
            name: host_name(),
            started: Instant::now(),
        }
    }
}

/// The machine's host name, or `plexus` when it cannot be read.
pub(crate) fn host_name() -> String {
    ["/proc/sys/kernel/hostname", "/etc/hostname"]
        .iter()
        .find_map(|path| {
            let name = std::fs::read_to_string(path).ok()?;
            let name = name.trim();
            (!name.is_empty()).then(|| name.to_owned())
        })
        .unwrap_or_else(|| "plexus".to_owned())
}

#[derive(Debug, Default, Deserialize)]
pub(super) struct ChannelsRequest {
    /// Only channels matching this pattern, where `*` matches any run of characters.
    #[serde(default)]
    pattern: String,
}

impl Validate for ChannelsRequest {}

#[derive(Debug, Serialize)]
pub(super) struct ChannelInfo {
    num_clients: u32,
}

#[derive(Debug, Serialize)]
pub(super) struct ChannelsResult {
    channels: BTreeMap<String, ChannelInfo>,
}

/// Channels with subscribers on any node, with their subscriber counts summed over the
/// nodes: this node's own when it is alone, else a survey of every live node.
pub(super) async fn channels(
    shared: &Shared,
    request: ChannelsRequest,
) -> Result<ChannelsResult, ErrorCode> {
    let nodes: std::collections::HashSet<Arc<str>> = shared
        .peers
        .live()
        .into_iter()
        .map(|node| node.node)
        .collect();
    let counts = if nodes.len() <= 1 {
        local_channels(shared, &request.pattern)
    } else {
        let answers = shared
            .surveys
            .ask(
                shared,
                crate::survey::CHANNELS,
                request.pattern.clone().into(),
                &nodes,
            )
            .await
            .map_err(|error| {
                tracing::warn!(%error, "channels: cannot ask the other nodes");
                ErrorCode::Internal
            })?;
        let mut counts = BTreeMap::new();
        for (node, answer) in answers {
            match serde_json::from_slice::<BTreeMap<String, u32>>(&answer) {
                Ok(channels) => {
                    for (channel, clients) in channels {
                        *counts.entry(channel).or_default() += clients;
                    }
                }
                Err(error) => tracing::warn!(%node, %error, "channels: a bad answer"),
            }
        }
        counts
    };
    let channels = counts
        .into_iter()
        .map(|(name, num_clients)| (name, ChannelInfo { num_clients }))
        .collect();
    Ok(ChannelsResult { channels })
}

/// This node's channels with subscribers whose names match the glob `pattern` (all when it is
/// empty), with their subscriber counts.
pub(crate) fn local_channels(shared: &Shared, pattern: &str) -> BTreeMap<String, u32> {
    shared
        .node
        .hub()
        .channels()
        .into_iter()
        .filter(|(name, _)| pattern.is_empty() || glob_matches(pattern, name))
        .map(|(name, clients)| (name.to_string(), clients as u32))
        .collect()
}

#[derive(Debug, Default, Deserialize)]
pub(super) struct InfoRequest {}

impl Validate for InfoRequest {}

#[derive(Debug, Serialize)]
pub(super) struct NodeInfo {
    uid: String,
    name: String,
    version: String,
    num_clients: u32,
    /// Distinct users among this node's subscribers.
    num_users: u32,
    num_channels: u32,
    num_subs: u32,
    /// Seconds since the server started.
    uptime: u64,
}

#[derive(Debug, Serialize)]
pub(super) struct InfoResult {
    nodes: Vec<NodeInfo>,
}

/// This node, and every other node heard from within [`crate::peers::SILENT`].
pub(super) async fn info(
    shared: &Shared,
    node: &NodeIdentity,
    _request: InfoRequest,
) -> Result<InfoResult, ErrorCode> {
    let name: Arc<str> = node.name.as_str().into();
    let uid: Arc<str> = node.uid.as_str().into();
    let local = crate::peers::local_stats(shared, &uid, &name, node.started);
    let mut others: Vec<NodeStats> = shared
        .peers
        .live()
        .into_iter()
        .filter(|stats| stats.node != uid)
        .collect();
    others.sort_by(|a, b| a.node.cmp(&b.node));
    let nodes = std::iter::once(local)
        .chain(others)
        .map(|stats| NodeInfo {
            uid: stats.node.to_string(),
            name: stats.name.to_string(),
            version: stats.version.to_string(),
            num_clients: stats.num_clients,
            num_users: stats.num_users,
            num_channels: stats.num_channels,
            num_subs: stats.num_subs,
            uptime: stats.uptime,
        })
        .collect();
    Ok(InfoResult { nodes })
}

/// Whether `name` matches `pattern`, in which `*` stands for any run of characters (none
/// included) and every other character for itself.
fn glob_matches(pattern: &str, name: &str) -> bool {
    let pattern: Vec<char> = pattern.chars().collect();
    let name: Vec<char> = name.chars().collect();
    let (mut p, mut n) = (0, 0);
    // The last `*` seen, and where in `name` its run currently ends.
    let mut star: Option<(usize, usize)> = None;
    while n < name.len() {
        if pattern.get(p) == Some(&'*') {
            star = Some((p, n));
            p += 1;
        } else if pattern.get(p) == Some(&name[n]) {
            p += 1;
            n += 1;
        } else if let Some((star_p, star_n)) = star {
            // Let the `*` take one more character and retry after it.
            star = Some((star_p, star_n + 1));
            p = star_p + 1;
            n = star_n + 1;
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        let check = |pattern: &str, name: &str, expected: bool| {
            assert_eq!(glob_matches(pattern, name), expected, "{pattern} ~ {name}");
        };
        check("chat:*", "chat:lobby", true);
        check("chat:*", "chat:", true);
        check("chat:*", "news:lobby", false);
        check("*", "", true);
        check("", "", true);
        check("", "x", false);
        check("*lob*", "chat:lobby", true);
        check("*:l*y", "chat:lobby", true);
        check("*:l*x", "chat:lobby", false);
        check("a*b*c", "aXbYbZc", true);
        check("a*b*c", "aXbYbZ", false);
        check("chat:lobby", "chat:lobby", true);
        check("chat:lobb", "chat:lobby", false);
        check("ch**y", "chat:lobby", true);
        check("é*", "éa", true);
    }
}
