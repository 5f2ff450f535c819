//! Channel names and the options that govern them.
//!
//! A channel is `namespace:name`, or just `name` in the default namespace. Each namespace has
//! [`ChannelOptions`]. A name may end in `#user1,user2` to make it user-limited: only those users
//! may subscribe (`dialog#42,43`).

use std::collections::HashMap;
use std::time::Duration;

/// What a namespace allows and keeps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelOptions {
    /// Publications kept per channel; 0 means no history (and no offsets).
    pub history_size: usize,
    /// How long each publication is kept.
    pub history_ttl: Duration,
    /// Subscribers get a stream position and may recover what they missed.
    pub recover: bool,
    /// What recovering gives: every missed publication, or only the latest one.
    pub recovery_mode: RecoveryMode,
    /// Who is subscribed is tracked and may be asked for.
    pub presence: bool,
    /// Joins and leaves are announced (to subscribers that ask for them).
    pub join_leave: bool,
    /// Joins and leaves are pushed to every subscriber, asked or not.
    pub force_push_join_leave: bool,
    /// Clients may publish here (the server API always may).
    pub allow_publish_for_client: bool,
    /// Connections without a user may subscribe.
    pub allow_subscribe_for_anonymous: bool,
    /// Subscribers may read the history.
    pub allow_history_for_client: bool,
    /// A subscription token is required to subscribe.
    pub private: bool,
    /// Most subscribers per channel on this node; 0 means no limit.
    pub max_subscribers: usize,
    /// A client's subscribe without a token is decided by the application's backend (the
    /// server's subscribe proxy), which grants it regardless of the permissions above.
    pub proxy_subscribe: bool,
    /// A client's publish is decided, and its data may be replaced, by the application's
    /// backend (the server's publish proxy), regardless of `allow_publish_for_client`.
    pub proxy_publish: bool,
    /// Subscribers may ask for delta compression (`delta: "fossil"`, Centrifugo's
    /// `allowed_delta_types`): publications then come as Fossil deltas from the previous one.
    /// Needs history (deltas follow offsets).
    pub fossil_delta: bool,
    /// Subscribers may pass a tags filter (`tf`, Centrifugo's `allow_tags_filter`) and then
    /// get only the publications whose tags match it.
    pub allow_tags_filter: bool,
}

impl ChannelOptions {
    /// A namespace that keeps nothing and allows nothing beyond subscribing with a user.
    pub fn closed() -> ChannelOptions {
        ChannelOptions {
            history_size: 0,
            history_ttl: Duration::ZERO,
            recover: false,
            recovery_mode: RecoveryMode::Stream,
            presence: false,
            join_leave: false,
            force_push_join_leave: false,
            allow_publish_for_client: false,
            allow_subscribe_for_anonymous: false,
            allow_history_for_client: false,
            private: false,
            max_subscribers: 0,
            proxy_subscribe: false,
            proxy_publish: false,
            fossil_delta: false,
            allow_tags_filter: false,
        }
    }

    /// The built-in `chat` namespace: history 100 / 5 min, recovery, presence, join/leave,
    /// clients may publish and read history, anonymous clients may subscribe.
    pub fn chat() -> ChannelOptions {
        ChannelOptions {
            history_size: 100,
            history_ttl: Duration::from_secs(300),
            recover: true,
            recovery_mode: RecoveryMode::Stream,
            presence: true,
            join_leave: true,
            force_push_join_leave: false,
            allow_publish_for_client: true,
            allow_subscribe_for_anonymous: true,
            allow_history_for_client: true,
            private: false,
            max_subscribers: 0,
            proxy_subscribe: false,
            proxy_publish: false,
            fossil_delta: false,
            allow_tags_filter: false,
        }
    }

    /// The built-in `quotes` namespace of the demo quotes page: history 100 / 1 min, recovery,
    /// anonymous subscribers, delta compression for those that ask; only the server publishes.
    pub fn quotes() -> ChannelOptions {
        ChannelOptions {
            history_size: 100,
            history_ttl: Duration::from_secs(60),
            recover: true,
            allow_subscribe_for_anonymous: true,
            allow_history_for_client: true,
            fossil_delta: true,
            ..ChannelOptions::closed()
        }
    }

    /// Whether clients without the native protocol (raw WebSocket rooms, TCP chat), which
    /// have no tokens to show and no backend to ask, may join: not where subscribing needs a
    /// subscription token or the backend, nor where publishing needs the backend.
    pub fn open_to_raw_clients(&self) -> bool {
        !self.private && !self.proxy_subscribe && !self.proxy_publish
    }

    /// A recovering subscribe gets the latest publication only ([`RecoveryMode::Cache`]).
    pub fn recovers_latest_only(&self) -> bool {
        self.recover && self.recovery_mode == RecoveryMode::Cache
    }

    pub fn has_history(&self) -> bool {
        self.history_size > 0 && !self.history_ttl.is_zero()
    }

    /// Whether a subscriber asking for Fossil deltas gets them: allowed, and the channel's
    /// publications have offsets to chain them by.
    pub fn gives_fossil_deltas(&self) -> bool {
        self.fossil_delta && self.has_history()
    }
}

/// What a recovering subscribe gets (Centrifugo's `force_recovery_mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RecoveryMode {
    /// Every publication after the client's position, or `recovered: false` if history no
    /// longer holds them all.
    #[default]
    Stream,
    /// Only the channel's latest publication (unless the client has it already): for
    /// channels whose every publication is the whole state (a quote, a score, a status).
    /// `recovered: false` if history does not hold it.
    Cache,
}

/// Why a channel name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChannelError {
    #[error("channel name is empty")]
    Empty,
    #[error("channel name is longer than {MAX_CHANNEL_LEN} bytes")]
    TooLong,
    #[error("unknown namespace {0:?}")]
    UnknownNamespace(String),
}

pub const MAX_CHANNEL_LEN: usize = 255;

/// All namespaces, and the options of channels without one.
#[derive(Debug, Clone)]
pub struct Namespaces {
    default: ChannelOptions,
    by_name: HashMap<String, ChannelOptions>,
}

impl Default for Namespaces {
    /// Zero configuration: the `chat` and `quotes` namespaces ([`ChannelOptions::chat`],
    /// [`ChannelOptions::quotes`]); the default namespace is closed.
    fn default() -> Namespaces {
        let mut namespaces = Namespaces::new(ChannelOptions::closed());
        namespaces.insert("chat", ChannelOptions::chat());
        namespaces.insert("quotes", ChannelOptions::quotes());
        namespaces
    }
}

impl Namespaces {
    pub fn new(default: ChannelOptions) -> Namespaces {
        Namespaces {
            default,
            by_name: HashMap::new(),
        }
    }

    pub fn insert(&mut self, name: &str, options: ChannelOptions) {
        self.by_name.insert(name.to_owned(), options);
    }

    /// The named namespaces and their options, by name.
    pub fn named(&self) -> Vec<(&str, &ChannelOptions)> {
        let mut named: Vec<_> = self
            .by_name
            .iter()
            .map(|(name, options)| (name.as_str(), options))
            .collect();
        named.sort_by_key(|(name, _)| *name);
        named
    }

    /// The options of a channel, or why the name is not acceptable.
    pub fn resolve(&self, channel: &str) -> Result<&ChannelOptions, ChannelError> {
        if channel.is_empty() {
            return Err(ChannelError::Empty);
        }
        if channel.len() > MAX_CHANNEL_LEN {
            return Err(ChannelError::TooLong);
        }
        match channel.split_once(':') {
            None => Ok(&self.default),
            Some((namespace, _)) => self
                .by_name
                .get(namespace)
                .ok_or_else(|| ChannelError::UnknownNamespace(namespace.to_owned())),
        }
    }
}

/// The users a user-limited channel (`name#a,b`) is for, or `None` for an ordinary channel.
pub fn allowed_users(channel: &str) -> Option<impl Iterator<Item = &str>> {
    channel
        .rsplit_once('#')
        .map(|(_, users)| users.split(',').filter(|user| !user.is_empty()))
}

/// Whether `user` may subscribe to `channel` as far as user limits go.
pub fn user_may_subscribe(channel: &str, user: &str) -> bool {
    match allowed_users(channel) {
        None => true,
        Some(mut users) => !user.is_empty() && users.any(|allowed| allowed == user),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_namespaces() {
        let namespaces = Namespaces::default();
        assert_eq!(
            namespaces.resolve("chat:lobby").unwrap(),
            &ChannelOptions::chat()
        );
        assert_eq!(
            namespaces.resolve("plain").unwrap(),
            &ChannelOptions::closed()
        );
        assert_eq!(
            namespaces.resolve("nope:x"),
            Err(ChannelError::UnknownNamespace("nope".into()))
        );
        assert_eq!(namespaces.resolve(""), Err(ChannelError::Empty));
        assert_eq!(
            namespaces.resolve(&"x".repeat(256)),
            Err(ChannelError::TooLong)
        );
    }

    #[test]
    fn user_limited_channels() {
        assert!(user_may_subscribe("dialog#42,43", "42"));
        assert!(user_may_subscribe("dialog#42,43", "43"));
        assert!(!user_may_subscribe("dialog#42,43", "44"));
        assert!(!user_may_subscribe("dialog#42,43", ""));
        assert!(user_may_subscribe("chat:lobby", ""));
        assert!(user_may_subscribe("chat:a#b#7", "7"));
    }
}
