//! Where the load goes: URL parsing, the loopback rule, and the rotation of source addresses.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use crate::BenchError;

/// A parsed `ws://` or `http://` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The URL as given.
    pub url: String,
    /// `ws` or `http`.
    pub scheme: &'static str,
    /// The host without IPv6 brackets, e.g. `127.0.0.1`, `localhost`, `::1`.
    pub host: String,
    pub port: u16,
    /// `host:port` as written (the `Host` header).
    pub authority: String,
    /// Path and query, starting with `/`.
    pub path: String,
}

impl Target {
    /// Parses a `ws://` URL (the WebSocket endpoints).
    pub fn websocket(url: &str) -> Result<Target, BenchError> {
        Target::parse(url, "ws")
    }

    /// Parses an `http://` URL (the server API).
    pub fn http(url: &str) -> Result<Target, BenchError> {
        Target::parse(url, "http")
    }

    fn parse(url: &str, scheme: &'static str) -> Result<Target, BenchError> {
        let usage = |why: String| BenchError::Usage(format!("{url}: {why}"));
        let Some((given, rest)) = url.split_once("://") else {
            return Err(usage(format!(
                "expected a URL like {scheme}://127.0.0.1:8000/…"
            )));
        };
        let given = given.to_ascii_lowercase();
        if given != scheme {
            let why = if given == "wss" || given == "https" {
                format!("{given}:// is not supported by plexus bench; use the plain {scheme}:// listener")
            } else {
                format!("expected a {scheme}:// URL")
            };
            return Err(usage(why));
        }
        let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let (authority, path) = rest.split_at(end);
        let path = path.split('#').next().unwrap_or("");
        let path = if path.is_empty() {
            "/".to_owned()
        } else if path.starts_with('?') {
            format!("/{path}")
        } else {
            path.to_owned()
        };
        if authority.contains('@') {
            return Err(usage("user information in the URL is not supported".into()));
        }
        let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
            let (host, after) = bracketed
                .split_once(']')
                .ok_or_else(|| usage("unclosed [ in the host".into()))?;
            let port = match after.strip_prefix(':') {
                Some(port) => Some(port),
                None if after.is_empty() => None,
                None => return Err(usage(format!("unexpected {after:?} after the host"))),
            };
            (host, port)
        } else {
            match authority.rsplit_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (authority, None),
            }
        };
        let port = match port {
            Some(port) => port
                .parse::<u16>()
                .ok()
                .filter(|port| *port != 0)
                .ok_or_else(|| usage(format!("bad port {port:?}")))?,
            None => 80,
        };
        if host.is_empty() {
            return Err(usage("no host".into()));
        }
        Ok(Target {
            url: url.to_owned(),
            scheme,
            host: host.to_owned(),
            port,
            authority: authority.to_owned(),
            path,
        })
    }

    /// Whether the host is on this machine: 127.0.0.0/8, `::1` or `localhost`.
    pub fn is_loopback(&self) -> bool {
        match self.host.parse::<IpAddr>() {
            Ok(ip) => ip.is_loopback(),
            Err(_) => self.host.eq_ignore_ascii_case("localhost"),
        }
    }

    /// Refuses a host that is not loopback unless `allow_remote`.
    pub fn check_allowed(&self, allow_remote: bool) -> Result<(), BenchError> {
        if self.is_loopback() || allow_remote {
            return Ok(());
        }
        Err(BenchError::Usage(format!(
            "refusing to load {}: plexus bench targets only loopback addresses (127.0.0.0/8, ::1, \
             localhost); pass --allow-remote to load a host you own",
            self.host
        )))
    }

    /// The address to connect to. `localhost` is 127.0.0.1 without asking a resolver; other
    /// names (only with `--allow-remote`) are resolved.
    pub async fn resolve(&self) -> Result<SocketAddr, BenchError> {
        if let Ok(ip) = self.host.parse::<IpAddr>() {
            return Ok(SocketAddr::new(ip, self.port));
        }
        if self.host.eq_ignore_ascii_case("localhost") {
            return Ok(SocketAddr::new(Ipv4Addr::LOCALHOST.into(), self.port));
        }
        let mut found = tokio::net::lookup_host((self.host.as_str(), self.port))
            .await
            .map_err(|error| BenchError::Connect {
                target: self.authority.clone(),
                reason: format!("cannot resolve {}: {error}", self.host),
            })?;
        found.next().ok_or_else(|| BenchError::Connect {
            target: self.authority.clone(),
            reason: format!("{} resolves to no address", self.host),
        })
    }

    /// For `/chat/{room}`, the room's channel `chat:{room}`.
    pub fn chat_channel(&self) -> Option<String> {
        let path = self.path.split('?').next().unwrap_or("");
        let room = path.strip_prefix("/chat/")?;
        (!room.is_empty() && !room.contains('/')).then(|| format!("chat:{room}"))
    }
}

/// The local addresses client sockets are bound to: 127.0.0.1, 127.0.0.2, … 127.0.0.N, in turn,
/// so that N × ~28 000 ephemeral ports are available instead of one address's worth.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sources {
    count: u32,
}

impl Sources {
    /// The most source addresses: 127.0.0.1 to 127.0.0.254.
    pub const MAX: u32 = 254;

    pub fn new(count: u32) -> Result<Sources, BenchError> {
        if count == 0 || count > Sources::MAX {
            return Err(BenchError::Usage(format!(
                "--sources must be 1 to {} (127.0.0.1 to 127.0.0.{}), not {count}",
                Sources::MAX,
                Sources::MAX
            )));
        }
        Ok(Sources { count })
    }

    pub fn count(&self) -> u32 {
        self.count
    }

    /// The source address of the connection with this index.
    pub fn nth(&self, index: u64) -> Ipv4Addr {
        let offset = (index % u64::from(self.count)) as u32;
        Ipv4Addr::from(u32::from(Ipv4Addr::new(127, 0, 0, 1)) + offset)
    }

    /// Sources apply to IPv4 loopback targets only: another host would not route a reply to
    /// 127.0.0.x, and ::1 has no such range.
    pub fn applies_to(addr: &SocketAddr) -> bool {
        matches!(addr.ip(), IpAddr::V4(ip) if ip.is_loopback())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ws(url: &str) -> Target {
        Target::websocket(url).unwrap()
    }

    fn usage(result: Result<Target, BenchError>) -> String {
        match result {
            Err(BenchError::Usage(message)) => message,
            other => panic!("expected a usage error, got {other:?}"),
        }
    }

    #[test]
    fn parses_websocket_urls() {
        let target = ws("ws://127.0.0.1:8000/chat/bench");
        assert_eq!(
            (target.host.as_str(), target.port, target.path.as_str()),
            ("127.0.0.1", 8000, "/chat/bench")
        );
        assert_eq!(target.authority, "127.0.0.1:8000");
        let target = ws("ws://localhost");
        assert_eq!(
            (target.host.as_str(), target.port, target.path.as_str()),
            ("localhost", 80, "/")
        );
        let target = ws("WS://[::1]:9000?x=1");
        assert_eq!(
            (target.host.as_str(), target.port, target.path.as_str()),
            ("::1", 9000, "/?x=1")
        );
        let target = ws("ws://127.0.0.1:1/connection/websocket?format=json#frag");
        assert_eq!(target.path, "/connection/websocket?format=json");
        assert_eq!(
            Target::http("http://127.0.0.1:8000/api/publish")
                .unwrap()
                .path,
            "/api/publish"
        );
    }

    #[test]
    fn rejects_bad_urls() {
        assert!(usage(Target::websocket("127.0.0.1:8000")).contains("expected a URL"));
        assert!(usage(Target::websocket("wss://127.0.0.1/echo")).contains("not supported"));
        assert!(usage(Target::websocket("http://127.0.0.1/echo")).contains("expected a ws://"));
        assert!(usage(Target::http("ws://127.0.0.1/api")).contains("expected a http://"));
        assert!(usage(Target::websocket("ws://127.0.0.1:0/")).contains("bad port"));
        assert!(usage(Target::websocket("ws://127.0.0.1:x/")).contains("bad port"));
        assert!(usage(Target::websocket("ws://:80/")).contains("no host"));
        assert!(usage(Target::websocket("ws://[::1/")).contains("unclosed"));
        assert!(usage(Target::websocket("ws://u@127.0.0.1/")).contains("user information"));
    }

    #[test]
    fn only_loopback_unless_allowed() {
        for url in [
            "ws://127.0.0.1:8000/echo",
            "ws://127.45.6.7/echo",
            "ws://localhost:8000/echo",
            "ws://LocalHost/echo",
            "ws://[::1]:8000/echo",
        ] {
            assert!(ws(url).is_loopback(), "{url}");
            ws(url).check_allowed(false).unwrap();
        }
        for url in [
            "ws://10.0.0.5/echo",
            "ws://192.168.1.2/echo",
            "ws://128.0.0.1/echo",
            "ws://example.com/echo",
            "ws://localhost.example.com/echo",
            "ws://[::2]/echo",
            "ws://0.0.0.0/echo",
        ] {
            let target = ws(url);
            assert!(!target.is_loopback(), "{url}");
            match target.check_allowed(false) {
                Err(BenchError::Usage(message)) => {
                    assert!(message.contains("--allow-remote"), "{message}");
                    assert!(message.contains(&target.host), "{message}");
                }
                other => panic!("{url}: {other:?}"),
            }
            target.check_allowed(true).unwrap();
        }
    }

    #[test]
    fn chat_channel_from_the_path() {
        assert_eq!(
            ws("ws://127.0.0.1/chat/bench").chat_channel().as_deref(),
            Some("chat:bench")
        );
        assert_eq!(
            ws("ws://127.0.0.1/chat/a?x").chat_channel().as_deref(),
            Some("chat:a")
        );
        assert_eq!(ws("ws://127.0.0.1/chat/").chat_channel(), None);
        assert_eq!(ws("ws://127.0.0.1/echo").chat_channel(), None);
    }

    #[test]
    fn sources_rotate_over_127_0_0_x() {
        let sources = Sources::new(3).unwrap();
        let seen: Vec<_> = (0..7).map(|i| sources.nth(i).to_string()).collect();
        assert_eq!(
            seen,
            [
                "127.0.0.1",
                "127.0.0.2",
                "127.0.0.3",
                "127.0.0.1",
                "127.0.0.2",
                "127.0.0.3",
                "127.0.0.1"
            ]
        );
        let one = Sources::new(1).unwrap();
        assert!((0..5).all(|i| one.nth(i) == Ipv4Addr::new(127, 0, 0, 1)));
        let all = Sources::new(Sources::MAX).unwrap();
        assert_eq!(all.nth(253), Ipv4Addr::new(127, 0, 0, 254));
        assert_eq!(all.nth(254), Ipv4Addr::new(127, 0, 0, 1));
        assert_eq!(all.nth(u64::MAX), all.nth(u64::MAX % 254));
        assert!(Sources::new(0).is_err());
        assert!(Sources::new(255).is_err());
    }

    #[test]
    fn sources_apply_to_ipv4_loopback_only() {
        assert!(Sources::applies_to(&"127.0.0.1:80".parse().unwrap()));
        assert!(Sources::applies_to(&"127.9.9.9:80".parse().unwrap()));
        assert!(!Sources::applies_to(&"[::1]:80".parse().unwrap()));
        assert!(!Sources::applies_to(&"10.0.0.1:80".parse().unwrap()));
    }
}
