use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::publication::ClientDescriptor;

/// Presence entries this node holds: per channel, by client id. The memory engine's whole
/// presence, and what a broker engine must refresh in the broker while its clients stay.
/// Adding and removing cost the same in a channel of any size.
#[derive(Debug, Default)]
pub struct PresenceMap(Mutex<HashMap<Arc<str>, ClientsById>>);

/// The clients present in one channel, by client id.
type ClientsById = HashMap<Arc<str>, Arc<ClientDescriptor>>;

impl PresenceMap {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, ClientsById>> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn add(&self, channel: &str, client: Arc<ClientDescriptor>) {
        self.lock()
            .entry(channel.into())
            .or_default()
            .insert(client.client.clone(), client);
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
            if clients.get(client).is_some_and(&matches) {
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
            .map(|clients| clients.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Every entry, for refreshing them in a broker.
    pub fn entries(&self) -> Vec<(Arc<str>, Arc<ClientDescriptor>)> {
        self.lock()
            .iter()
            .flat_map(|(channel, clients)| {
                clients
                    .values()
                    .map(move |client| (channel.clone(), client.clone()))
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
        presence.forget("a", &first); // re-added meanwhile: stays
        assert_eq!(presence.clients("a").len(), 2);
        presence.forget("a", &again);
        presence.remove("a", "c2");
        assert!(presence.clients("a").is_empty());
        assert_eq!(presence.entries().len(), 1);
    }
}
