use std::borrow::Borrow;
use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};

use crate::publication::ClientDescriptor;

/// Presence entries this node holds: per channel, by client id. The memory engine's whole
/// presence, and what a broker engine must refresh in the broker while its clients stay.
/// Adding and removing cost the same in a channel of any size.
#[derive(Debug, Default)]
pub struct PresenceMap(Mutex<HashMap<Arc<str>, Clients>>);

/// The clients present in one channel, found by client id: one pointer an entry (the id is in
/// the descriptor), since a channel may hold every connection of the node.
type Clients = HashSet<Present>;

#[derive(Debug)]
struct Present(Arc<ClientDescriptor>);

impl Hash for Present {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // As `str` hashes, so that `Borrow<str>` finds it.
        (*self.0.client).hash(state);
    }
}

impl PartialEq for Present {
    fn eq(&self, other: &Present) -> bool {
        self.0.client == other.0.client
    }
}

impl Eq for Present {}

impl Borrow<str> for Present {
    fn borrow(&self) -> &str {
        &self.0.client
    }
}

impl PresenceMap {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, Clients>> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Adds `client`, replacing an entry with the same client id.
    pub fn add(&self, channel: &str, client: Arc<ClientDescriptor>) {
        self.lock()
            .entry(channel.into())
            .or_default()
            .replace(Present(client));
    }

    pub fn remove(&self, channel: &str, client: &str) {
        self.remove_where(channel, client, |_| true);
    }

    /// Removes `client` only if the entry is still this very one (not added again since): for
    /// an engine undoing an add that the broker refused.
    pub fn forget(&self, channel: &str, client: &Arc<ClientDescriptor>) {
        self.remove_where(channel, &client.client, |known| Arc::ptr_eq(known, client));
    }

    fn remove_where(
        &self,
        channel: &str,
        client: &str,
        matches: impl Fn(&Arc<ClientDescriptor>) -> bool,
    ) {
        let mut presence = self.lock();
        if let Some(clients) = presence.get_mut(channel) {
            if clients.get(client).is_some_and(|known| matches(&known.0)) {
                clients.remove(client);
            }
            if clients.is_empty() {
                presence.remove(channel);
            }
        }
    }

    /// The clients present in a channel.
    pub fn clients(&self, channel: &str) -> Vec<Arc<ClientDescriptor>> {
        self.lock()
            .get(channel)
            .map(|clients| clients.iter().map(|client| client.0.clone()).collect())
            .unwrap_or_default()
    }

    /// Every entry, for refreshing them in a broker.
    pub fn entries(&self) -> Vec<(Arc<str>, Arc<ClientDescriptor>)> {
        self.lock()
            .iter()
            .flat_map(|(channel, clients)| {
                clients
                    .iter()
                    .map(move |client| (channel.clone(), client.0.clone()))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(id: &str) -> Arc<ClientDescriptor> {
        Arc::new(ClientDescriptor {
            user: "u".into(),
            client: id.into(),
            conn_info: None,
            chan_info: None,
        })
    }

    #[test]
    fn add_remove_forget() {
        let presence = PresenceMap::default();
        let first = client("c1");
        presence.add("a", first.clone());
        presence.add("a", client("c2"));
        presence.add("b", client("c1"));
        assert_eq!(presence.clients("a").len(), 2);
        assert_eq!(presence.entries().len(), 3);
        let again = client("c1");
        presence.add("a", again.clone());
        let clients = presence.clients("a");
        assert_eq!(clients.len(), 2);
        assert!(
            clients.iter().any(|known| Arc::ptr_eq(known, &again)),
            "the later add replaced the entry"
        );
        presence.forget("a", &first); // re-added meanwhile: stays
        assert_eq!(presence.clients("a").len(), 2);
        presence.forget("a", &again);
        presence.remove("a", "c2");
        assert!(presence.clients("a").is_empty());
        assert_eq!(presence.entries().len(), 1);
    }
}
