//! Configuration: one list of settings, read from a TOML file, `PLEXUS_*` environment variables
//! and command-line flags, in that order of precedence from low to high.
//!
//! [`Settings`] is that list with every value optional; the binary parses flags and environment
//! into one `Settings` (clap reads both), loads the file into another, layers them with
//! [`Settings::or`] and turns the result into a checked [`Config`] with [`Settings::resolve`].
//! A file that cannot be read or holds an unknown key or a bad value is an error naming the key,
//! never a silent fallback to defaults.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use plexus_core::{ChannelOptions, Namespaces, RecoveryMode};
use serde::Deserialize;

/// Every setting, each optional. Field names are the TOML keys; flags are the same names in
/// kebab-case (`--max-message-size`), environment variables the same in upper case with a
/// `PLEXUS_` prefix (`PLEXUS_MAX_MESSAGE_SIZE`).
#[derive(Debug, Clone, Default, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// HTTP and WebSocket listener [default: 127.0.0.1:8000]
    #[arg(long, env = "PLEXUS_LISTEN", value_name = "ADDR")]
    pub listen: Option<String>,
    /// TCP echo listener, or `off` [default: 127.0.0.1:8001]
    #[arg(long, env = "PLEXUS_TCP_ECHO", value_name = "ADDR|off")]
    pub tcp_echo: Option<String>,
    /// TCP chat listener, or `off` [default: 127.0.0.1:8002]
    #[arg(long, env = "PLEXUS_TCP_CHAT", value_name = "ADDR|off")]
    pub tcp_chat: Option<String>,
    /// PEM certificate chain: serve https and wss on the main listener (with --tls-key)
    #[arg(long, env = "PLEXUS_TLS_CERT", value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert
    #[arg(long, env = "PLEXUS_TLS_KEY", value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// Largest WebSocket message or TCP chat line accepted, in bytes [default: 65536]
    #[arg(long, env = "PLEXUS_MAX_MESSAGE_SIZE", value_name = "BYTES")]
    pub max_message_size: Option<usize>,
    /// How often the server pings each WebSocket [default: 25s]
    #[arg(long, env = "PLEXUS_PING_INTERVAL", value_name = "DURATION")]
    pub ping_interval: Option<String>,
    /// How long after a ping a silent peer is closed [default: 10s]
    #[arg(long, env = "PLEXUS_PONG_TIMEOUT", value_name = "DURATION")]
    pub pong_timeout: Option<String>,
    /// Time allowed for the TLS handshake and the HTTP request head [default: 10s]
    #[arg(long, env = "PLEXUS_HANDSHAKE_TIMEOUT", value_name = "DURATION")]
    pub handshake_timeout: Option<String>,
    /// Extra time a client whose token expired has to send `refresh` before it is closed (3005);
    /// the official SDKs refresh at the expiry itself [default: 25s]
    #[arg(long, env = "PLEXUS_EXPIRED_CLOSE_DELAY", value_name = "DURATION")]
    pub expired_close_delay: Option<String>,
    /// The same for a subscription token: extra time for `sub_refresh` before the subscription
    /// ends (2501) [default: 25s]
    #[arg(long, env = "PLEXUS_EXPIRED_SUB_CLOSE_DELAY", value_name = "DURATION")]
    pub expired_sub_close_delay: Option<String>,
    /// TCP echo and chat connections silent this long are closed [default: 5m]
    #[arg(long, env = "PLEXUS_TCP_IDLE_TIMEOUT", value_name = "DURATION")]
    pub tcp_idle_timeout: Option<String>,
    /// A write that makes no progress this long closes its connection [default: 30s]
    #[arg(long, env = "PLEXUS_WRITE_TIMEOUT", value_name = "DURATION")]
    pub write_timeout: Option<String>,
    /// Longest wait for connections to close on shutdown [default: 10s]
    #[arg(long, env = "PLEXUS_SHUTDOWN_TIMEOUT", value_name = "DURATION")]
    pub shutdown_timeout: Option<String>,
    /// Most open connections in all [default: 100000]
    #[arg(long, env = "PLEXUS_MAX_CONNECTIONS", value_name = "N")]
    pub max_connections: Option<usize>,
    /// Most open connections from one IP address [default: 10000]
    #[arg(long, env = "PLEXUS_MAX_CONNECTIONS_PER_IP", value_name = "N")]
    pub max_connections_per_ip: Option<usize>,
    /// Bytes queued for one slow connection before it is cut with 3008 [default: 1048576]
    #[arg(long, env = "PLEXUS_OUTBOX_LIMIT", value_name = "BYTES")]
    pub outbox_limit: Option<usize>,
    /// Most messages (protocol commands) one connection may send a second, in bursts of as
    /// many; 0 for no limit. Over it a protocol command gets error 111, and a raw WebSocket
    /// (1008) or TCP client is closed [default: 0]
    #[arg(long, env = "PLEXUS_MAX_MESSAGES_PER_SECOND", value_name = "N")]
    pub max_messages_per_second: Option<u32>,
    /// Offer permessage-deflate to WebSocket clients [default: false]
    #[arg(long, env = "PLEXUS_WEBSOCKET_COMPRESSION", value_name = "BOOL")]
    pub websocket_compression: Option<bool>,
    /// Where durable history and generated secrets live [default: ./plexus-data]
    #[arg(long, env = "PLEXUS_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Storage engine: embedded (durable, under data_dir), memory, or redis or nats (shared by
    /// several nodes) [default: embedded]
    #[arg(long, env = "PLEXUS_ENGINE", value_name = "embedded|memory|redis|nats")]
    pub engine: Option<String>,
    /// Redis server of the redis engine [default: redis://127.0.0.1:6379]
    #[arg(
        long,
        env = "PLEXUS_REDIS_URL",
        value_name = "URL",
        hide_env_values = true
    )]
    pub redis_url: Option<String>,
    /// Prefix of the redis engine's keys and channels, so installations can share a Redis
    /// [default: plexus]
    #[arg(long, env = "PLEXUS_REDIS_PREFIX", value_name = "PREFIX")]
    pub redis_prefix: Option<String>,
    /// With a rediss:// redis_url: the CA certificate(s) (PEM text or a file path) the Redis
    /// server's certificate must chain to [default: the system's and Mozilla's roots]
    #[arg(long, env = "PLEXUS_REDIS_TLS_CA", value_name = "PEM|FILE")]
    pub redis_tls_ca: Option<String>,
    /// With rediss://: this node's client certificate and key (PEM text or file paths), for a
    /// Redis that requires client certificates
    #[arg(long, env = "PLEXUS_REDIS_TLS_CERT", value_name = "PEM|FILE")]
    pub redis_tls_cert: Option<String>,
    #[arg(
        long,
        env = "PLEXUS_REDIS_TLS_KEY",
        value_name = "PEM|FILE",
        hide_env_values = true
    )]
    pub redis_tls_key: Option<String>,
    /// Redis Sentinel addresses (host:port, comma-separated; rediss://host:port for TLS): the
    /// redis engine asks them for the master of redis_sentinel_master at each (re)connection and
    /// follows failovers; redis_url then gives only the password, the database and, with
    /// rediss://, TLS to the master
    #[arg(
        long,
        env = "PLEXUS_REDIS_SENTINELS",
        value_name = "ADDRS",
        value_delimiter = ','
    )]
    pub redis_sentinels: Option<Vec<String>>,
    /// The master's name in Sentinel (`sentinel monitor NAME ...`)
    #[arg(long, env = "PLEXUS_REDIS_SENTINEL_MASTER", value_name = "NAME")]
    pub redis_sentinel_master: Option<String>,
    /// Redis Cluster: addresses of some of its nodes (host:port, comma-separated), asked for
    /// the slot map; redis_url then gives only the password and, with rediss://, TLS
    #[arg(
        long,
        env = "PLEXUS_REDIS_CLUSTER",
        value_name = "ADDRS",
        value_delimiter = ','
    )]
    pub redis_cluster: Option<Vec<String>>,
    /// With redis_cluster (Redis 7 or later): sharded pub/sub, whose publications stay on
    /// their channel's master instead of crossing the cluster bus to every node; every node
    /// must agree [default: false]
    #[arg(long, env = "PLEXUS_REDIS_CLUSTER_SHARDED_PUBSUB", value_name = "BOOL")]
    pub redis_cluster_sharded_pubsub: Option<bool>,
    /// NATS server(s) of the nats engine, comma-separated (JetStream enabled)
    /// [default: nats://127.0.0.1:4222]
    #[arg(
        long,
        env = "PLEXUS_NATS_URL",
        value_name = "URL",
        hide_env_values = true
    )]
    pub nats_url: Option<String>,
    /// Prefix of the nats engine's subjects, streams and bucket, so installations can share a
    /// NATS (letters, digits, '-', '_') [default: plexus]
    #[arg(long, env = "PLEXUS_NATS_PREFIX", value_name = "PREFIX")]
    pub nats_prefix: Option<String>,
    /// With tls:// nats_url: the CA certificate(s) (PEM text or a file path) the NATS
    /// server's certificate must chain to [default: the system's roots]
    #[arg(long, env = "PLEXUS_NATS_TLS_CA", value_name = "PEM|FILE")]
    pub nats_tls_ca: Option<String>,
    /// With tls://: this node's client certificate and key (PEM text or file paths), for a
    /// NATS that verifies clients
    #[arg(long, env = "PLEXUS_NATS_TLS_CERT", value_name = "PEM|FILE")]
    pub nats_tls_cert: Option<String>,
    #[arg(
        long,
        env = "PLEXUS_NATS_TLS_KEY",
        value_name = "PEM|FILE",
        hide_env_values = true
    )]
    pub nats_tls_key: Option<String>,
    /// Keep everything in memory (same as --engine memory)
    #[arg(long, env = "PLEXUS_MEMORY")]
    #[serde(skip)]
    pub memory: bool,
    /// Key for the server HTTP API [default: generated in data_dir on first start]
    #[arg(
        long,
        env = "PLEXUS_API_KEY",
        value_name = "KEY",
        hide_env_values = true
    )]
    pub api_key: Option<String>,
    /// HMAC secret for connection and subscription JWTs [default: generated in data_dir]
    #[arg(
        long,
        env = "PLEXUS_TOKEN_HMAC_SECRET",
        value_name = "SECRET",
        hide_env_values = true
    )]
    pub token_hmac_secret: Option<String>,
    /// RSA public key (PEM text or a file path) for RS256 tokens
    #[arg(long, env = "PLEXUS_TOKEN_RSA_PUBLIC_KEY", value_name = "PEM|FILE")]
    pub token_rsa_public_key: Option<String>,
    /// ECDSA public key (PEM text or a file path) for ES256 tokens
    #[arg(long, env = "PLEXUS_TOKEN_ECDSA_PUBLIC_KEY", value_name = "PEM|FILE")]
    pub token_ecdsa_public_key: Option<String>,
    /// JSON Web Key Set URL (http:// or https://) of an identity provider: RS*/ES* tokens
    /// whose header names a `kid` are checked with that key; fetched at start, every 10
    /// minutes, and when a token names an unknown `kid`
    #[arg(long, env = "PLEXUS_TOKEN_JWKS_URL", value_name = "URL")]
    pub token_jwks_url: Option<String>,
    /// Let protocol clients connect without a token, as anonymous users [default: false]
    #[arg(
        long,
        env = "PLEXUS_ALLOW_ANONYMOUS_CONNECT_WITHOUT_TOKEN",
        value_name = "BOOL"
    )]
    pub allow_anonymous_connect_without_token: Option<bool>,
    /// Browser origins allowed to open WebSockets, comma-separated (`*` for any); same-origin
    /// pages and non-browser clients are always allowed
    #[arg(
        long,
        env = "PLEXUS_ALLOWED_ORIGINS",
        value_name = "ORIGINS",
        value_delimiter = ','
    )]
    pub allowed_origins: Option<Vec<String>>,
    /// Backend that answers protocol clients' `rpc` commands (an http:// or https:// URL,
    /// POSTed JSON as Centrifugo's RPC proxy); without it `rpc` gets error 108 (not available)
    #[arg(long, env = "PLEXUS_RPC_PROXY_URL", value_name = "URL")]
    pub rpc_proxy_url: Option<String>,
    /// How long the RPC backend may take to answer [default: 1s]
    #[arg(long, env = "PLEXUS_RPC_PROXY_TIMEOUT", value_name = "DURATION")]
    pub rpc_proxy_timeout: Option<String>,
    /// Backend that authenticates protocol clients connecting without a token (an http:// or
    /// https:// URL, POSTed JSON as Centrifugo's connect proxy; it sees the headers listed in
    /// proxy_http_headers, cookies say)
    #[arg(long, env = "PLEXUS_CONNECT_PROXY_URL", value_name = "URL")]
    pub connect_proxy_url: Option<String>,
    /// Backend that extends (or ends) connections the connect proxy made when they expire
    #[arg(long, env = "PLEXUS_REFRESH_PROXY_URL", value_name = "URL")]
    pub refresh_proxy_url: Option<String>,
    /// Backend that decides subscribes without a token in namespaces with proxy_subscribe
    #[arg(long, env = "PLEXUS_SUBSCRIBE_PROXY_URL", value_name = "URL")]
    pub subscribe_proxy_url: Option<String>,
    /// Backend that decides (and may rewrite) client publishes in namespaces with
    /// proxy_publish
    #[arg(long, env = "PLEXUS_PUBLISH_PROXY_URL", value_name = "URL")]
    pub publish_proxy_url: Option<String>,
    /// How long the connect, subscribe and publish backends may take [default: 1s]
    #[arg(long, env = "PLEXUS_PROXY_TIMEOUT", value_name = "DURATION")]
    pub proxy_timeout: Option<String>,
    /// Headers of a client's HTTP request (the WebSocket upgrade, the SSE or HTTP-streaming
    /// request) passed on to the connect, subscribe, publish and RPC backends, e.g.
    /// Cookie,Authorization [default: none]
    #[arg(
        long,
        env = "PLEXUS_PROXY_HTTP_HEADERS",
        value_name = "NAMES",
        value_delimiter = ','
    )]
    pub proxy_http_headers: Option<Vec<String>>,
    /// Channel namespaces (TOML `[[namespaces]]` only)
    #[arg(skip)]
    pub namespaces: Option<Vec<NamespaceSettings>>,
    /// Log format: text or json [default: text]
    #[arg(long, env = "PLEXUS_LOG_FORMAT", value_name = "text|json")]
    pub log_format: Option<String>,
    /// Log filter, e.g. info or plexus_server=debug [default: info]
    #[arg(long, env = "PLEXUS_LOG_LEVEL", value_name = "FILTER")]
    pub log_level: Option<String>,
}

/// One `[[namespaces]]` entry; options left out take the closed default (nothing kept,
/// nothing allowed) — except for a namespace named `chat`, which starts from the built-in one.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamespaceSettings {
    pub name: String,
    pub history_size: Option<usize>,
    pub history_ttl: Option<String>,
    pub recover: Option<bool>,
    /// `stream` (every missed publication) or `cache` (only the latest).
    pub force_recovery_mode: Option<String>,
    /// Centrifugo's name for `recover` (subscriptions are recoverable whatever the client
    /// asks): either may be set.
    pub force_recovery: Option<bool>,
    pub presence: Option<bool>,
    pub join_leave: Option<bool>,
    pub force_push_join_leave: Option<bool>,
    pub allow_publish_for_client: Option<bool>,
    pub allow_subscribe_for_anonymous: Option<bool>,
    pub allow_history_for_client: Option<bool>,
    pub private: Option<bool>,
    pub max_subscribers: Option<usize>,
    pub proxy_subscribe: Option<bool>,
    pub proxy_publish: Option<bool>,
    /// Delta compression subscribers may ask for: `["fossil"]` or none.
    pub allowed_delta_types: Option<Vec<String>>,
    /// Subscribers may filter publications by their tags.
    pub allow_tags_filter: Option<bool>,
}

/// A configuration that could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid {key}: {reason}")]
    Invalid { key: &'static str, reason: String },
}

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// TLS certificate and key files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A complete, checked configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    /// `None` when the listener is off.
    pub tcp_echo: Option<SocketAddr>,
    pub tcp_chat: Option<SocketAddr>,
    pub tls: Option<TlsFiles>,
    pub max_message_size: usize,
    pub ping_interval: Duration,
    pub pong_timeout: Duration,
    pub handshake_timeout: Duration,
    /// Grace after a connection token's expiry for the client's own `refresh` (whole seconds).
    pub expired_close_delay: Duration,
    /// Grace after a subscription token's expiry for `sub_refresh` (whole seconds).
    pub expired_sub_close_delay: Duration,
    pub tcp_idle_timeout: Duration,
    pub write_timeout: Duration,
    pub shutdown_timeout: Duration,
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    pub outbox_limit: usize,
    /// Per connection; 0: no limit.
    pub max_messages_per_second: u32,
    pub websocket_compression: bool,
    pub data_dir: PathBuf,
    pub engine: EngineKind,
    /// The redis engine's server (`redis://…`, `rediss://…` or `unix://…`).
    pub redis_url: String,
    /// The redis engine's key and channel prefix.
    pub redis_prefix: String,
    /// PEM text: the roots a `rediss://` server's certificate must chain to.
    pub redis_tls_ca: Option<String>,
    /// PEM texts: this node's client certificate and key for Redis.
    pub redis_tls_client: Option<(String, String)>,
    /// Sentinel `redis://host:port` addresses and the master's name.
    pub redis_sentinel: Option<(Vec<String>, String)>,
    /// Redis Cluster: `host:port` addresses of seed nodes.
    pub redis_cluster: Option<Vec<String>>,
    /// Redis Cluster with sharded pub/sub.
    pub redis_cluster_sharded_pubsub: bool,
    /// The nats engine's server(s) (`nats://…` or `tls://…`, comma-separated).
    pub nats_url: String,
    /// The nats engine's subject, stream and bucket prefix.
    pub nats_prefix: String,
    /// PEM text: the roots a `tls://` NATS server's certificate must chain to.
    pub nats_tls_ca: Option<String>,
    /// PEM texts: this node's client certificate and key for NATS.
    pub nats_tls_client: Option<(String, String)>,
    /// `None`: generate one in `data_dir` on first start.
    pub api_key: Option<String>,
    pub token_hmac_secret: Option<String>,
    /// PEM text.
    pub token_rsa_public_key: Option<String>,
    pub token_ecdsa_public_key: Option<String>,
    /// An identity provider's JSON Web Key Set.
    pub token_jwks_url: Option<String>,
    /// At most one fetch of the key set per this long because of unknown `kid`s (10 s; not a
    /// setting: it protects the identity provider).
    pub token_jwks_refetch: Duration,
    pub allow_anonymous_connect_without_token: bool,
    pub allowed_origins: Vec<String>,
    /// The RPC backend (`http://…` or `https://…`).
    pub rpc_proxy_url: Option<String>,
    pub rpc_proxy_timeout: Duration,
    /// The connect, refresh, subscribe and publish proxies' backends.
    pub connect_proxy_url: Option<String>,
    pub refresh_proxy_url: Option<String>,
    pub subscribe_proxy_url: Option<String>,
    pub publish_proxy_url: Option<String>,
    pub proxy_timeout: Duration,
    /// Names of the client request's headers passed to the backends.
    pub proxy_http_headers: Vec<http::HeaderName>,
    pub namespaces: Namespaces,
    pub log_format: LogFormat,
    pub log_level: String,
}

/// Where history and presence live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineKind {
    /// Durable, on disk under `data_dir`.
    Embedded,
    Memory,
    /// History, presence and delivery in Redis (`redis_url`), shared by every node using it.
    Redis,
    /// History (JetStream), presence and delivery in NATS (`nats_url`), shared by every node
    /// using it.
    Nats,
}

impl Default for Config {
    fn default() -> Config {
        Settings::default()
            .resolve()
            .expect("the built-in defaults are valid")
    }
}

impl Config {
    /// The defaults with every listener on an ephemeral port of 127.0.0.1, the memory engine,
    /// API key `test-api-key` and token secret `test-token-secret`: what tests use.
    pub fn for_tests() -> Config {
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        Config {
            listen: any,
            tcp_echo: Some(any),
            tcp_chat: Some(any),
            engine: EngineKind::Memory,
            api_key: Some("test-api-key".into()),
            token_hmac_secret: Some("test-token-secret".into()),
            ..Config::default()
        }
    }
}

fn parse_addr(key: &'static str, value: &str) -> Result<SocketAddr, ConfigError> {
    value.trim().parse().map_err(|_| ConfigError::Invalid {
        key,
        reason: format!("{value:?} is not an address like 127.0.0.1:8000"),
    })
}

fn parse_optional_addr(key: &'static str, value: &str) -> Result<Option<SocketAddr>, ConfigError> {
    if value.trim().eq_ignore_ascii_case("off") {
        Ok(None)
    } else {
        parse_addr(key, value).map(Some)
    }
}

fn parse_duration(key: &'static str, value: &str) -> Result<Duration, ConfigError> {
    humantime::parse_duration(value.trim()).map_err(|error| ConfigError::Invalid {
        key,
        reason: format!("{value:?} is not a duration like 25s or 500ms ({error})"),
    })
}

fn positive(key: &'static str, value: usize) -> Result<usize, ConfigError> {
    if value == 0 {
        return Err(ConfigError::Invalid {
            key,
            reason: "must be greater than 0".into(),
        });
    }
    Ok(value)
}

fn non_empty(key: &'static str, value: Option<String>) -> Result<Option<String>, ConfigError> {
    match value {
        Some(value) if value.trim().is_empty() => Err(ConfigError::Invalid {
            key,
            reason: "must not be empty".into(),
        }),
        other => Ok(other),
    }
}

/// The redis engine's URL: `redis://`, `rediss://` (TLS) or `unix://`.
fn redis_url(value: Option<String>) -> Result<String, ConfigError> {
    let Some(url) = non_empty("redis_url", value)? else {
        return Ok("redis://127.0.0.1:6379".to_owned());
    };
    let url = url.trim();
    if ["redis://", "rediss://", "unix://", "redis+unix://"]
        .iter()
        .any(|scheme| url.starts_with(scheme))
    {
        Ok(url.to_owned())
    } else {
        // Not echoed: it may hold a password.
        Err(ConfigError::Invalid {
            key: "redis_url",
            reason: "must start with redis://, rediss:// or unix://".into(),
        })
    }
}

/// A URL the server fetches from (the RPC backend, the JWKS): `http://` or `https://`, with a
/// host.
fn fetch_url(key: &'static str, value: Option<String>) -> Result<Option<String>, ConfigError> {
    let Some(url) = non_empty(key, value)? else {
        return Ok(None);
    };
    let url = url.trim();
    match url.parse::<http::Uri>() {
        Ok(uri) if matches!(uri.scheme_str(), Some("http" | "https")) && uri.host().is_some() => {
            Ok(Some(url.to_owned()))
        }
        // Not echoed: it may hold credentials.
        _ => Err(ConfigError::Invalid {
            key,
            reason: "is not an http:// or https:// URL with a host".into(),
        }),
    }
}

/// Headers that say how the request to a backend is framed or routed: a client must not
/// choose them.
const UNFORWARDABLE: [&str; 11] = [
    "host",
    "content-length",
    "content-type",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "proxy-connection",
    "upgrade",
    "te",
    "trailer",
    "expect",
];

/// Header names to pass to the backends, checked and lowercased.
fn header_names(names: Option<Vec<String>>) -> Result<Vec<http::HeaderName>, ConfigError> {
    names
        .unwrap_or_default()
        .iter()
        .map(|name| name.trim())
        .filter(|name| !name.is_empty())
        .map(|name| {
            let invalid = |reason: String| ConfigError::Invalid {
                key: "proxy_http_headers",
                reason,
            };
            let name = http::HeaderName::try_from(name.to_ascii_lowercase())
                .map_err(|_| invalid(format!("{name:?} is not a header name")))?;
            if UNFORWARDABLE.contains(&name.as_str()) {
                return Err(invalid(format!(
                    "{name} frames or routes the request to the backend; it cannot come from a client"
                )));
            }
            Ok(name)
        })
        .collect()
}

/// What the redis TLS options need.
const REDIS_TLS: &str = "a rediss:// redis_url or rediss:// redis_sentinels";

/// The redis URLs the TLS options (CA, client certificate) apply to: `redis_url`, or, with
/// Sentinel, the sentinels' when they are TLS and the master's is not.
fn redis_tls_urls(url: &str, sentinel: Option<&(Vec<String>, String)>) -> String {
    match sentinel {
        Some((sentinels, _))
            if !url.starts_with("rediss://")
                && sentinels.iter().any(|s| s.starts_with("rediss://")) =>
        {
            sentinels.join(",")
        }
        _ => url.to_owned(),
    }
}

/// Sentinel addresses (`host:port`, `redis://` or `rediss://`; all TLS or none) and the
/// master's name, both or neither.
fn redis_sentinel(
    sentinels: Option<Vec<String>>,
    master: Option<String>,
) -> Result<Option<(Vec<String>, String)>, ConfigError> {
    let sentinels: Vec<String> = redis_addresses("redis_sentinels", sentinels)?
        .into_iter()
        .map(|(scheme, address)| format!("{scheme}://{address}"))
        .collect();
    let tls = sentinels
        .iter()
        .filter(|s| s.starts_with("rediss://"))
        .count();
    if tls != 0 && tls != sentinels.len() {
        return Err(ConfigError::Invalid {
            key: "redis_sentinels",
            reason: "must all be rediss:// (TLS) or none".into(),
        });
    }
    let master = master
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty());
    match (sentinels.is_empty(), master) {
        (true, None) => Ok(None),
        (false, Some(master)) => Ok(Some((sentinels, master))),
        (false, None) => Err(ConfigError::Invalid {
            key: "redis_sentinel_master",
            reason: "is needed with redis_sentinels".into(),
        }),
        (true, Some(_)) => Err(ConfigError::Invalid {
            key: "redis_sentinels",
            reason: "are needed with redis_sentinel_master".into(),
        }),
    }
}

/// `host:port` addresses, each perhaps written `redis://host:port` or `rediss://host:port`:
/// the scheme (`redis` or `rediss`) and `host:port` of each; blanks are skipped.
fn redis_addresses(
    key: &'static str,
    addresses: Option<Vec<String>>,
) -> Result<Vec<(&'static str, String)>, ConfigError> {
    addresses
        .unwrap_or_default()
        .iter()
        .map(|address| address.trim())
        .filter(|address| !address.is_empty())
        .map(|address| {
            let (scheme, address) = match address.strip_prefix("rediss://") {
                Some(address) => ("rediss", address),
                None => ("redis", address.strip_prefix("redis://").unwrap_or(address)),
            };
            let address = address.trim_end_matches('/');
            match address.rsplit_once(':') {
                Some((host, port))
                    if !host.is_empty() && port.parse::<u16>().is_ok_and(|port| port != 0) =>
                {
                    Ok((scheme, address.to_owned()))
                }
                _ => Err(ConfigError::Invalid {
                    key,
                    reason: format!("{address:?} is not host:port"),
                }),
            }
        })
        .collect()
}

/// Redis Cluster seed nodes (`host:port`). TLS, the password and the user come from
/// `redis_url` (whose database, if any, the engine checks is 0); not with Sentinel.
fn redis_cluster(
    nodes: Option<Vec<String>>,
    url: &str,
    sentinel: &Option<(Vec<String>, String)>,
) -> Result<Option<Vec<String>>, ConfigError> {
    let nodes = redis_addresses("redis_cluster", nodes)?;
    if nodes.is_empty() {
        return Ok(None);
    }
    let invalid = |reason: &str| ConfigError::Invalid {
        key: "redis_cluster",
        reason: reason.to_owned(),
    };
    if sentinel.is_some() {
        return Err(invalid("cannot be used with redis_sentinels"));
    }
    if nodes.iter().any(|(scheme, _)| *scheme == "rediss") && !url.starts_with("rediss://") {
        return Err(invalid(
            "takes TLS from redis_url: make it rediss://, and the nodes host:port",
        ));
    }
    Ok(Some(
        nodes.into_iter().map(|(_, address)| address).collect(),
    ))
}

/// The nats engine's server list: `nats://` or `tls://` URLs, comma-separated.
fn nats_url(value: Option<String>) -> Result<String, ConfigError> {
    let Some(urls) = non_empty("nats_url", value)? else {
        return Ok("nats://127.0.0.1:4222".to_owned());
    };
    let urls: Vec<&str> = urls.split(',').map(str::trim).collect();
    if urls.iter().all(|url| {
        ["nats://", "tls://"]
            .iter()
            .any(|scheme| url.len() > scheme.len() && url.starts_with(scheme))
    }) {
        Ok(urls.join(","))
    } else {
        // Not echoed: it may hold a password.
        Err(ConfigError::Invalid {
            key: "nats_url",
            reason: "must be nats:// or tls:// URLs, separated by commas".into(),
        })
    }
}

/// A broker's CA certificates (PEM inline or a file), only for TLS URLs: a CA given for a
/// plain-text connection would look like TLS without being it.
fn tls_ca(
    key: &'static str,
    value: Option<String>,
    urls: &str,
    needs: &str,
) -> Result<Option<String>, ConfigError> {
    let Some(pem) = pem_or_file(key, value)? else {
        return Ok(None);
    };
    tls_urls_only(key, urls, needs)?;
    pem_certificates(key, &pem)?;
    Ok(Some(pem))
}

/// Refuses a TLS option (`key`) for URLs that are not all TLS ones.
fn tls_urls_only(key: &'static str, urls: &str, needs: &str) -> Result<(), ConfigError> {
    if urls
        .split(',')
        .all(|url| url.starts_with("rediss://") || url.starts_with("tls://"))
    {
        Ok(())
    } else {
        Err(ConfigError::Invalid {
            key,
            reason: format!("is for {needs} only"),
        })
    }
}

/// Checks that `pem` holds PEM certificates, at least one.
fn pem_certificates(key: &'static str, pem: &str) -> Result<(), ConfigError> {
    use rustls_pki_types::pem::PemObject;
    let certificates = rustls_pki_types::CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| ConfigError::Invalid {
            key,
            reason: format!("is not PEM certificates: {error}"),
        })?;
    if certificates.is_empty() {
        return Err(ConfigError::Invalid {
            key,
            reason: "holds no PEM certificate".into(),
        });
    }
    Ok(())
}

/// A broker client certificate and its key (PEM inline or files), both or neither, only for
/// TLS URLs.
fn tls_client(
    (cert_key, cert): (&'static str, Option<String>),
    (key_key, key): (&'static str, Option<String>),
    urls: &str,
    needs: &str,
) -> Result<Option<(String, String)>, ConfigError> {
    let (cert, key) = match (pem_or_file(cert_key, cert)?, pem_or_file(key_key, key)?) {
        (None, None) => return Ok(None),
        (Some(cert), Some(key)) => (cert, key),
        (Some(_), None) => {
            return Err(ConfigError::Invalid {
                key: key_key,
                reason: format!("is needed with {cert_key}"),
            })
        }
        (None, Some(_)) => {
            return Err(ConfigError::Invalid {
                key: cert_key,
                reason: format!("is needed with {key_key}"),
            })
        }
    };
    tls_urls_only(cert_key, urls, needs)?;
    pem_certificates(cert_key, &cert)?;
    use rustls_pki_types::pem::PemObject;
    if rustls_pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes()).is_err() {
        return Err(ConfigError::Invalid {
            key: key_key,
            reason: "holds no PEM private key".into(),
        });
    }
    Ok(Some((cert, key)))
}

/// A PEM given inline, or read from the file it names.
fn pem_or_file(key: &'static str, value: Option<String>) -> Result<Option<String>, ConfigError> {
    let Some(value) = value else {
        return Ok(None);
    };
    if value.trim_start().starts_with("-----BEGIN") {
        return Ok(Some(value));
    }
    std::fs::read_to_string(value.trim())
        .map(Some)
        .map_err(|error| ConfigError::Invalid {
            key,
            reason: format!("cannot read {:?}: {error}", value.trim()),
        })
}

fn namespaces(entries: Vec<NamespaceSettings>) -> Result<Namespaces, ConfigError> {
    let mut namespaces = Namespaces::default();
    let mut seen = std::collections::HashSet::new();
    for entry in entries {
        if entry.name.is_empty()
            || !entry
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
        {
            return Err(ConfigError::Invalid {
                key: "namespaces.name",
                reason: format!("{:?} must be letters, digits, '_', '-' or '.'", entry.name),
            });
        }
        if !seen.insert(entry.name.clone()) {
            return Err(ConfigError::Invalid {
                key: "namespaces.name",
                reason: format!("namespace {:?} is defined twice", entry.name),
            });
        }
        let base = if entry.name == "chat" {
            ChannelOptions::chat()
        } else {
            ChannelOptions::closed()
        };
        let history_ttl = match &entry.history_ttl {
            Some(ttl) => parse_duration("namespaces.history_ttl", ttl)?,
            None if entry.history_size.is_some_and(|size| size > 0)
                && base.history_ttl.is_zero() =>
            {
                std::time::Duration::from_secs(300)
            }
            None => base.history_ttl,
        };
        let options = ChannelOptions {
            history_size: entry.history_size.unwrap_or(base.history_size),
            history_ttl,
            recover: entry
                .recover
                .or(entry.force_recovery)
                .unwrap_or(base.recover),
            recovery_mode: match entry.force_recovery_mode.as_deref().map(str::trim) {
                None => base.recovery_mode,
                Some("stream" | "") => RecoveryMode::Stream,
                Some("cache") => RecoveryMode::Cache,
                Some(other) => {
                    return Err(ConfigError::Invalid {
                        key: "namespaces.force_recovery_mode",
                        reason: format!("{other:?} is neither \"stream\" nor \"cache\""),
                    })
                }
            },
            presence: entry.presence.unwrap_or(base.presence),
            join_leave: entry.join_leave.unwrap_or(base.join_leave),
            force_push_join_leave: entry
                .force_push_join_leave
                .unwrap_or(base.force_push_join_leave),
            allow_publish_for_client: entry
                .allow_publish_for_client
                .unwrap_or(base.allow_publish_for_client),
            allow_subscribe_for_anonymous: entry
                .allow_subscribe_for_anonymous
                .unwrap_or(base.allow_subscribe_for_anonymous),
            allow_history_for_client: entry
                .allow_history_for_client
                .unwrap_or(base.allow_history_for_client),
            private: entry.private.unwrap_or(base.private),
            max_subscribers: entry.max_subscribers.unwrap_or(base.max_subscribers),
            proxy_subscribe: entry.proxy_subscribe.unwrap_or(base.proxy_subscribe),
            proxy_publish: entry.proxy_publish.unwrap_or(base.proxy_publish),
            fossil_delta: match entry.allowed_delta_types.as_deref() {
                None => base.fossil_delta,
                Some(types) => {
                    if let Some(other) = types.iter().find(|kind| kind.as_str() != "fossil") {
                        return Err(ConfigError::Invalid {
                            key: "namespaces.allowed_delta_types",
                            reason: format!("{other:?} is not a delta type (only \"fossil\" is)"),
                        });
                    }
                    !types.is_empty()
                }
            },
            allow_tags_filter: entry.allow_tags_filter.unwrap_or(base.allow_tags_filter),
        };
        if options.fossil_delta && !options.has_history() {
            return Err(ConfigError::Invalid {
                key: "namespaces.allowed_delta_types",
                reason: format!(
                    "namespace {:?} allows deltas but keeps no history to chain them by (set history_size and history_ttl)",
                    entry.name
                ),
            });
        }
        if options.recover && !options.has_history() {
            return Err(ConfigError::Invalid {
                key: "namespaces.recover",
                reason: format!("namespace {:?} recovers but keeps no history (set history_size and history_ttl)", entry.name),
            });
        }
        if entry.recover.is_some()
            && entry.force_recovery.is_some()
            && entry.recover != entry.force_recovery
        {
            return Err(ConfigError::Invalid {
                key: "namespaces.force_recovery",
                reason: format!(
                    "namespace {:?} sets recover and force_recovery (one option) differently",
                    entry.name
                ),
            });
        }
        if options.recovery_mode == RecoveryMode::Cache && !options.recover {
            return Err(ConfigError::Invalid {
                key: "namespaces.force_recovery_mode",
                reason: format!(
                    "namespace {:?} recovers from a cache but not recover = true",
                    entry.name
                ),
            });
        }
        namespaces.insert(&entry.name, options);
    }
    Ok(namespaces)
}

impl Settings {
    /// Reads a TOML file. Unknown keys are errors, so a typo is never silently ignored.
    pub fn load_file(path: &Path) -> Result<Settings, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|error| ConfigError::Parse {
            path: path.to_owned(),
            message: error.to_string().trim().replace('\n', " "),
        })
    }

    /// Each setting from `self` if set there, else from `lower`.
    pub fn or(self, lower: Settings) -> Settings {
        Settings {
            listen: self.listen.or(lower.listen),
            tcp_echo: self.tcp_echo.or(lower.tcp_echo),
            tcp_chat: self.tcp_chat.or(lower.tcp_chat),
            tls_cert: self.tls_cert.or(lower.tls_cert),
            tls_key: self.tls_key.or(lower.tls_key),
            max_message_size: self.max_message_size.or(lower.max_message_size),
            ping_interval: self.ping_interval.or(lower.ping_interval),
            pong_timeout: self.pong_timeout.or(lower.pong_timeout),
            handshake_timeout: self.handshake_timeout.or(lower.handshake_timeout),
            expired_close_delay: self.expired_close_delay.or(lower.expired_close_delay),
            expired_sub_close_delay: self
                .expired_sub_close_delay
                .or(lower.expired_sub_close_delay),
            tcp_idle_timeout: self.tcp_idle_timeout.or(lower.tcp_idle_timeout),
            write_timeout: self.write_timeout.or(lower.write_timeout),
            shutdown_timeout: self.shutdown_timeout.or(lower.shutdown_timeout),
            max_connections: self.max_connections.or(lower.max_connections),
            max_connections_per_ip: self.max_connections_per_ip.or(lower.max_connections_per_ip),
            outbox_limit: self.outbox_limit.or(lower.outbox_limit),
            max_messages_per_second: self
                .max_messages_per_second
                .or(lower.max_messages_per_second),
            websocket_compression: self.websocket_compression.or(lower.websocket_compression),
            data_dir: self.data_dir.or(lower.data_dir),
            engine: self.engine.or(lower.engine),
            redis_url: self.redis_url.or(lower.redis_url),
            redis_prefix: self.redis_prefix.or(lower.redis_prefix),
            redis_tls_ca: self.redis_tls_ca.or(lower.redis_tls_ca),
            redis_tls_cert: self.redis_tls_cert.or(lower.redis_tls_cert),
            redis_tls_key: self.redis_tls_key.or(lower.redis_tls_key),
            redis_sentinels: self.redis_sentinels.or(lower.redis_sentinels),
            redis_sentinel_master: self.redis_sentinel_master.or(lower.redis_sentinel_master),
            redis_cluster: self.redis_cluster.or(lower.redis_cluster),
            redis_cluster_sharded_pubsub: self
                .redis_cluster_sharded_pubsub
                .or(lower.redis_cluster_sharded_pubsub),
            nats_url: self.nats_url.or(lower.nats_url),
            nats_prefix: self.nats_prefix.or(lower.nats_prefix),
            nats_tls_ca: self.nats_tls_ca.or(lower.nats_tls_ca),
            nats_tls_cert: self.nats_tls_cert.or(lower.nats_tls_cert),
            nats_tls_key: self.nats_tls_key.or(lower.nats_tls_key),
            memory: self.memory || lower.memory,
            api_key: self.api_key.or(lower.api_key),
            token_hmac_secret: self.token_hmac_secret.or(lower.token_hmac_secret),
            token_rsa_public_key: self.token_rsa_public_key.or(lower.token_rsa_public_key),
            token_ecdsa_public_key: self.token_ecdsa_public_key.or(lower.token_ecdsa_public_key),
            token_jwks_url: self.token_jwks_url.or(lower.token_jwks_url),
            allow_anonymous_connect_without_token: self
                .allow_anonymous_connect_without_token
                .or(lower.allow_anonymous_connect_without_token),
            allowed_origins: self.allowed_origins.or(lower.allowed_origins),
            rpc_proxy_url: self.rpc_proxy_url.or(lower.rpc_proxy_url),
            rpc_proxy_timeout: self.rpc_proxy_timeout.or(lower.rpc_proxy_timeout),
            connect_proxy_url: self.connect_proxy_url.or(lower.connect_proxy_url),
            refresh_proxy_url: self.refresh_proxy_url.or(lower.refresh_proxy_url),
            subscribe_proxy_url: self.subscribe_proxy_url.or(lower.subscribe_proxy_url),
            publish_proxy_url: self.publish_proxy_url.or(lower.publish_proxy_url),
            proxy_timeout: self.proxy_timeout.or(lower.proxy_timeout),
            proxy_http_headers: self.proxy_http_headers.or(lower.proxy_http_headers),
            namespaces: self.namespaces.or(lower.namespaces),
            log_format: self.log_format.or(lower.log_format),
            log_level: self.log_level.or(lower.log_level),
        }
    }

    /// Fills in defaults and checks every value.
    pub fn resolve(self) -> Result<Config, ConfigError> {
        let redis_url = redis_url(self.redis_url)?;
        let nats_url = nats_url(self.nats_url)?;
        let redis_sentinel = redis_sentinel(self.redis_sentinels, self.redis_sentinel_master)?;
        let redis_cluster = redis_cluster(self.redis_cluster, &redis_url, &redis_sentinel)?;
        let clustered = redis_cluster.is_some();
        let redis_cluster_sharded_pubsub = self.redis_cluster_sharded_pubsub.unwrap_or(false);
        if redis_cluster_sharded_pubsub && !clustered {
            return Err(ConfigError::Invalid {
                key: "redis_cluster_sharded_pubsub",
                reason: "needs redis_cluster".into(),
            });
        }
        let subscribe_proxy_url = fetch_url("subscribe_proxy_url", self.subscribe_proxy_url)?;
        let publish_proxy_url = fetch_url("publish_proxy_url", self.publish_proxy_url)?;
        let entries = self.namespaces.unwrap_or_default();
        for entry in &entries {
            for (asks, url, key) in [
                (
                    entry.proxy_subscribe,
                    &subscribe_proxy_url,
                    "subscribe_proxy_url",
                ),
                (entry.proxy_publish, &publish_proxy_url, "publish_proxy_url"),
            ] {
                if asks == Some(true) && url.is_none() {
                    return Err(ConfigError::Invalid {
                        key,
                        reason: format!("is needed by namespace {:?}", entry.name),
                    });
                }
            }
        }
        let namespaces = namespaces(entries)?;
        let redis_tls_urls = redis_tls_urls(&redis_url, redis_sentinel.as_ref());
        let tls = match (self.tls_cert, self.tls_key) {
            (Some(cert), Some(key)) => Some(TlsFiles { cert, key }),
            (None, None) => None,
            (Some(_), None) => {
                return Err(ConfigError::Invalid {
                    key: "tls_key",
                    reason: "tls_cert is set but tls_key is not".into(),
                })
            }
            (None, Some(_)) => {
                return Err(ConfigError::Invalid {
                    key: "tls_cert",
                    reason: "tls_key is set but tls_cert is not".into(),
                })
            }
        };
        let log_format = match self.log_format.as_deref().unwrap_or("text") {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                return Err(ConfigError::Invalid {
                    key: "log_format",
                    reason: format!("{other:?} is neither text nor json"),
                })
            }
        };
        let duration = |key, value: Option<String>, default: &str| {
            parse_duration(key, value.as_deref().unwrap_or(default))
        };
        let ping_interval = duration("ping_interval", self.ping_interval, "25s")?;
        if ping_interval.is_zero() {
            return Err(ConfigError::Invalid {
                key: "ping_interval",
                reason: "must be greater than 0".into(),
            });
        }
        Ok(Config {
            listen: parse_addr("listen", self.listen.as_deref().unwrap_or("127.0.0.1:8000"))?,
            tcp_echo: parse_optional_addr(
                "tcp_echo",
                self.tcp_echo.as_deref().unwrap_or("127.0.0.1:8001"),
            )?,
            tcp_chat: parse_optional_addr(
                "tcp_chat",
                self.tcp_chat.as_deref().unwrap_or("127.0.0.1:8002"),
            )?,
            tls,
            max_message_size: positive(
                "max_message_size",
                self.max_message_size.unwrap_or(64 * 1024),
            )?,
            ping_interval,
            pong_timeout: duration("pong_timeout", self.pong_timeout, "10s")?,
            handshake_timeout: duration("handshake_timeout", self.handshake_timeout, "10s")?,
            expired_close_delay: duration("expired_close_delay", self.expired_close_delay, "25s")?,
            expired_sub_close_delay: duration(
                "expired_sub_close_delay",
                self.expired_sub_close_delay,
                "25s",
            )?,
            tcp_idle_timeout: duration("tcp_idle_timeout", self.tcp_idle_timeout, "5m")?,
            write_timeout: duration("write_timeout", self.write_timeout, "30s")?,
            shutdown_timeout: duration("shutdown_timeout", self.shutdown_timeout, "10s")?,
            max_connections: positive("max_connections", self.max_connections.unwrap_or(100_000))?,
            max_connections_per_ip: positive(
                "max_connections_per_ip",
                self.max_connections_per_ip.unwrap_or(10_000),
            )?,
            outbox_limit: positive("outbox_limit", self.outbox_limit.unwrap_or(1 << 20))?,
            max_messages_per_second: self.max_messages_per_second.unwrap_or(0),
            websocket_compression: self.websocket_compression.unwrap_or(false),
            data_dir: self
                .data_dir
                .unwrap_or_else(|| PathBuf::from("plexus-data")),
            engine: match (self.memory, self.engine.as_deref().unwrap_or("embedded")) {
                (true, _) | (false, "memory") => EngineKind::Memory,
                (false, "embedded") => EngineKind::Embedded,
                (false, "redis") => EngineKind::Redis,
                (false, "nats") => EngineKind::Nats,
                (false, other) => {
                    return Err(ConfigError::Invalid {
                        key: "engine",
                        reason: format!("{other:?} is not embedded, memory, redis or nats"),
                    })
                }
            },
            redis_tls_ca: tls_ca(
                "redis_tls_ca",
                self.redis_tls_ca,
                &redis_tls_urls,
                REDIS_TLS,
            )?,
            redis_tls_client: tls_client(
                ("redis_tls_cert", self.redis_tls_cert),
                ("redis_tls_key", self.redis_tls_key),
                &redis_tls_urls,
                REDIS_TLS,
            )?,
            redis_sentinel,
            redis_cluster,
            redis_cluster_sharded_pubsub,
            redis_url,
            redis_prefix: match non_empty("redis_prefix", self.redis_prefix)? {
                Some(prefix) if clustered && prefix.contains(['{', '}']) => {
                    return Err(ConfigError::Invalid {
                        key: "redis_prefix",
                        reason: "must not contain '{' or '}' with redis_cluster (hash tags)".into(),
                    })
                }
                Some(prefix) => prefix.trim().to_owned(),
                None => "plexus".to_owned(),
            },
            nats_tls_ca: tls_ca(
                "nats_tls_ca",
                self.nats_tls_ca,
                &nats_url,
                "tls:// nats_url servers",
            )?,
            nats_tls_client: tls_client(
                ("nats_tls_cert", self.nats_tls_cert),
                ("nats_tls_key", self.nats_tls_key),
                &nats_url,
                "tls:// nats_url servers",
            )?,
            nats_url,
            nats_prefix: match non_empty("nats_prefix", self.nats_prefix)? {
                Some(prefix) if plexus_engine_nats::valid_prefix(prefix.trim()) => {
                    prefix.trim().to_owned()
                }
                Some(prefix) => {
                    return Err(ConfigError::Invalid {
                        key: "nats_prefix",
                        reason: format!("{prefix:?} must be letters, digits, '-' or '_'"),
                    })
                }
                None => "plexus".to_owned(),
            },
            api_key: non_empty("api_key", self.api_key)?,
            token_hmac_secret: non_empty("token_hmac_secret", self.token_hmac_secret)?,
            token_rsa_public_key: pem_or_file("token_rsa_public_key", self.token_rsa_public_key)?,
            token_ecdsa_public_key: pem_or_file(
                "token_ecdsa_public_key",
                self.token_ecdsa_public_key,
            )?,
            token_jwks_url: fetch_url("token_jwks_url", self.token_jwks_url)?,
            token_jwks_refetch: Duration::from_secs(10),
            allow_anonymous_connect_without_token: self
                .allow_anonymous_connect_without_token
                .unwrap_or(false),
            allowed_origins: self.allowed_origins.unwrap_or_default(),
            rpc_proxy_url: fetch_url("rpc_proxy_url", self.rpc_proxy_url)?,
            rpc_proxy_timeout: duration("rpc_proxy_timeout", self.rpc_proxy_timeout, "1s")?,
            connect_proxy_url: fetch_url("connect_proxy_url", self.connect_proxy_url)?,
            refresh_proxy_url: fetch_url("refresh_proxy_url", self.refresh_proxy_url)?,
            subscribe_proxy_url,
            publish_proxy_url,
            proxy_timeout: duration("proxy_timeout", self.proxy_timeout, "1s")?,
            proxy_http_headers: header_names(self.proxy_http_headers)?,
            namespaces,
            log_format,
            log_level: self.log_level.unwrap_or_else(|| "info".into()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults() {
        let config = Config::default();
        assert_eq!(config.listen.to_string(), "127.0.0.1:8000");
        assert_eq!(config.tcp_echo.unwrap().to_string(), "127.0.0.1:8001");
        assert_eq!(config.tcp_chat.unwrap().to_string(), "127.0.0.1:8002");
        assert_eq!(config.max_message_size, 65_536);
        assert_eq!(config.ping_interval, Duration::from_secs(25));
        assert_eq!(config.pong_timeout, Duration::from_secs(10));
        assert!(!config.websocket_compression);
        assert_eq!(config.redis_url, "redis://127.0.0.1:6379");
        assert_eq!(config.redis_prefix, "plexus");
        assert_eq!(config.nats_url, "nats://127.0.0.1:4222");
        assert_eq!(config.nats_prefix, "plexus");
    }

    #[test]
    fn nats_engine() {
        let settings: Settings = toml::from_str(
            "engine = \"nats\"\nnats_url = \"nats://u:secret@10.0.0.5:4222, tls://10.0.0.6:4222\"\nnats_prefix = \"app_1\"\n",
        )
        .unwrap();
        let config = settings.resolve().unwrap();
        assert_eq!(config.engine, EngineKind::Nats);
        assert_eq!(
            config.nats_url,
            "nats://u:secret@10.0.0.5:4222,tls://10.0.0.6:4222"
        );
        assert_eq!(config.nats_prefix, "app_1");
        let bad = Settings {
            nats_url: Some("redis://:secret@x".into()),
            ..Settings::default()
        };
        let error = bad.resolve().unwrap_err().to_string();
        assert!(
            error.contains("nats_url") && !error.contains("secret"),
            "{error}"
        );
        for prefix in [" ", "a.b", "a b", "x>"] {
            let bad = Settings {
                nats_prefix: Some(prefix.into()),
                ..Settings::default()
            };
            let error = bad.resolve().unwrap_err().to_string();
            assert!(error.contains("nats_prefix"), "{prefix:?}: {error}");
        }
        let flags = Settings {
            engine: Some("nats".into()),
            ..Settings::default()
        };
        assert_eq!(flags.resolve().unwrap().engine, EngineKind::Nats);
    }

    #[test]
    fn redis_engine() {
        let settings: Settings = toml::from_str(
            "engine = \"redis\"\nredis_url = \"redis://:secret@10.0.0.5:6380/2\"\nredis_prefix = \"app1\"\n",
        )
        .unwrap();
        let config = settings.resolve().unwrap();
        assert_eq!(config.engine, EngineKind::Redis);
        assert_eq!(config.redis_url, "redis://:secret@10.0.0.5:6380/2");
        assert_eq!(config.redis_prefix, "app1");
        let bad = Settings {
            redis_url: Some("http://:secret@x".into()),
            ..Settings::default()
        };
        let error = bad.resolve().unwrap_err().to_string();
        assert!(
            error.contains("redis_url") && !error.contains("secret"),
            "{error}"
        );
        let empty = Settings {
            redis_prefix: Some(" ".into()),
            ..Settings::default()
        };
        assert!(empty
            .resolve()
            .unwrap_err()
            .to_string()
            .contains("redis_prefix"));
    }

    #[test]
    fn broker_tls_certificate_authorities() {
        const PEM: &str = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("ca.pem");
        std::fs::write(&file, PEM).unwrap();
        let config = Settings {
            redis_url: Some("rediss://:secret@redis.example:6380".into()),
            redis_tls_ca: Some(file.to_str().unwrap().into()),
            nats_url: Some("tls://a:4222, tls://b:4222".into()),
            nats_tls_ca: Some(PEM.into()),
            ..Settings::default()
        }
        .resolve()
        .unwrap();
        assert_eq!(config.redis_url, "rediss://:secret@redis.example:6380");
        assert_eq!(config.redis_tls_ca.as_deref(), Some(PEM));
        assert_eq!(config.nats_tls_ca.as_deref(), Some(PEM));
        let refused = |settings: Settings, key: &str, why: &str| {
            let error = settings.resolve().unwrap_err().to_string();
            assert!(error.contains(key) && error.contains(why), "{error}");
            assert!(!error.contains("secret"), "{error}");
        };
        refused(
            Settings {
                redis_url: Some("redis://:secret@x".into()),
                redis_tls_ca: Some(PEM.into()),
                ..Settings::default()
            },
            "redis_tls_ca",
            "rediss://",
        );
        refused(
            Settings {
                nats_url: Some("tls://a:4222,nats://:secret@b:4222".into()),
                nats_tls_ca: Some(PEM.into()),
                ..Settings::default()
            },
            "nats_tls_ca",
            "tls://",
        );
        refused(
            Settings {
                redis_url: Some("rediss://x".into()),
                redis_tls_ca: Some(dir.path().join("missing.pem").to_str().unwrap().into()),
                ..Settings::default()
            },
            "redis_tls_ca",
            "cannot read",
        );
        std::fs::write(&file, "not a certificate").unwrap();
        refused(
            Settings {
                redis_url: Some("rediss://x".into()),
                redis_tls_ca: Some(file.to_str().unwrap().into()),
                ..Settings::default()
            },
            "redis_tls_ca",
            "no PEM certificate",
        );
    }

    #[test]
    fn broker_client_certificates() {
        let pki = plexus_core::conformance::TestPki::new();
        let config = Settings {
            redis_url: Some("rediss://redis.example:6380".into()),
            redis_tls_cert: Some(pki.client_cert.clone()),
            redis_tls_key: Some(pki.client_key.clone()),
            nats_url: Some("tls://nats.example:4222".into()),
            nats_tls_cert: Some(pki.client_cert.clone()),
            nats_tls_key: Some(pki.client_key.clone()),
            ..Settings::default()
        }
        .resolve()
        .unwrap();
        let pair = Some((pki.client_cert.clone(), pki.client_key.clone()));
        assert_eq!(config.redis_tls_client, pair);
        assert_eq!(config.nats_tls_client, pair);
        for (settings, key, why) in [
            (
                Settings {
                    redis_url: Some("rediss://x".into()),
                    redis_tls_cert: Some(pki.client_cert.clone()),
                    ..Settings::default()
                },
                "redis_tls_key",
                "is needed",
            ),
            (
                Settings {
                    redis_tls_cert: Some(pki.client_cert.clone()),
                    redis_tls_key: Some(pki.client_key.clone()),
                    ..Settings::default()
                },
                "redis_tls_cert",
                "rediss://",
            ),
            (
                Settings {
                    nats_url: Some("tls://n:4222".into()),
                    nats_tls_cert: Some(pki.client_cert.clone()),
                    nats_tls_key: Some(pki.client_cert.clone()),
                    ..Settings::default()
                },
                "nats_tls_key",
                "no PEM private key",
            ),
        ] {
            let error = settings.resolve().unwrap_err().to_string();
            assert!(error.contains(key) && error.contains(why), "{error}");
        }
    }

    #[test]
    fn rpc_proxy() {
        let config = Settings {
            rpc_proxy_url: Some("http://backend.internal:8080/centrifugo/rpc".into()),
            rpc_proxy_timeout: Some("250ms".into()),
            ..Settings::default()
        }
        .resolve()
        .unwrap();
        assert_eq!(
            config.rpc_proxy_url.as_deref(),
            Some("http://backend.internal:8080/centrifugo/rpc")
        );
        assert_eq!(config.rpc_proxy_timeout, Duration::from_millis(250));
        assert_eq!(Config::default().rpc_proxy_url, None);
        assert_eq!(Config::default().rpc_proxy_timeout, Duration::from_secs(1));
        let https = Settings {
            rpc_proxy_url: Some("https://backend.example/rpc".into()),
            token_jwks_url: Some("https://idp.example/.well-known/jwks.json".into()),
            ..Settings::default()
        }
        .resolve()
        .unwrap();
        assert_eq!(
            https.token_jwks_url.as_deref(),
            Some("https://idp.example/.well-known/jwks.json")
        );
        let error = Settings {
            token_jwks_url: Some("idp.example/jwks".into()),
            ..Settings::default()
        }
        .resolve()
        .unwrap_err()
        .to_string();
        assert!(error.contains("token_jwks_url"), "{error}");
        for (url, why) in [
            ("backend:8080/rpc", "not an http:// or https:// URL"),
            (
                "ftp://user:secret@backend/rpc",
                "not an http:// or https:// URL",
            ),
        ] {
            let error = Settings {
                rpc_proxy_url: Some(url.into()),
                ..Settings::default()
            }
            .resolve()
            .unwrap_err()
            .to_string();
            assert!(
                error.contains("rpc_proxy_url") && error.contains(why),
                "{error}"
            );
        }
    }

    #[test]
    fn proxy_namespaces_need_their_backend() {
        let settings = |name: &str, subscribe: bool| Settings {
            namespaces: Some(vec![NamespaceSettings {
                name: name.into(),
                proxy_subscribe: Some(subscribe),
                proxy_publish: Some(!subscribe),
                ..NamespaceSettings::default()
            }]),
            proxy_http_headers: Some(vec!["Cookie".into(), " X-Real-IP ".into()]),
            ..Settings::default()
        };
        let error = settings("team", true).resolve().unwrap_err().to_string();
        assert!(
            error.contains("subscribe_proxy_url") && error.contains("team"),
            "{error}"
        );
        let error = settings("team", false).resolve().unwrap_err().to_string();
        assert!(error.contains("publish_proxy_url"), "{error}");
        let config = Settings {
            subscribe_proxy_url: Some("http://backend:8080/subscribe".into()),
            ..settings("team", true)
        }
        .resolve()
        .unwrap();
        assert!(config.namespaces.resolve("team:x").unwrap().proxy_subscribe);
        assert_eq!(config.proxy_http_headers, ["cookie", "x-real-ip"]);
        for bad in ["bad header", "Host", "Content-Length"] {
            let error = Settings {
                proxy_http_headers: Some(vec![bad.into()]),
                ..Settings::default()
            }
            .resolve()
            .unwrap_err()
            .to_string();
            assert!(error.contains("proxy_http_headers"), "{bad}: {error}");
        }
    }

    #[test]
    fn redis_cluster_settings() {
        let config: Settings = toml::from_str(
            "engine = \"redis\"\nredis_url = \"rediss://:secret@redis\"\nredis_cluster = [\"10.0.0.1:7000\", \"rediss://10.0.0.2:7000/\", \" \"]\n",
        )
        .unwrap();
        let config = config.resolve().unwrap();
        assert_eq!(
            config.redis_cluster,
            Some(vec!["10.0.0.1:7000".to_owned(), "10.0.0.2:7000".to_owned()])
        );
        assert_eq!(Config::default().redis_cluster, None);
        assert!(
            !config.redis_cluster_sharded_pubsub,
            "classic pub/sub by default"
        );
        let refused = |settings: Settings| settings.resolve().unwrap_err().to_string();
        let alone = Settings {
            redis_cluster_sharded_pubsub: Some(true),
            ..Settings::default()
        };
        assert!(refused(alone).contains("redis_cluster_sharded_pubsub"));
        let cluster = |nodes: &[&str]| Settings {
            redis_cluster: Some(nodes.iter().map(|node| node.to_string()).collect()),
            ..Settings::default()
        };
        for (settings, key) in [
            (cluster(&["10.0.0.1"]), "redis_cluster"),
            (cluster(&["10.0.0.1:0"]), "redis_cluster"),
            (cluster(&["rediss://10.0.0.1:7000"]), "redis_cluster"),
            (
                Settings {
                    redis_prefix: Some("app{1}".into()),
                    ..cluster(&["10.0.0.1:7000"])
                },
                "redis_prefix",
            ),
            (
                Settings {
                    redis_sentinels: Some(vec!["10.0.0.1:26379".into()]),
                    redis_sentinel_master: Some("m".into()),
                    ..cluster(&["10.0.0.1:7000"])
                },
                "redis_cluster",
            ),
        ] {
            let error = refused(settings);
            assert!(error.contains(key), "{key}: {error}");
        }
    }

    #[test]
    fn redis_sentinel_settings() {
        let config: Settings = toml::from_str(
            "engine = \"redis\"\nredis_url = \"redis://:secret@mymaster/2\"\nredis_sentinels = [\"10.0.0.1:26379\", \"redis://10.0.0.2:26379\"]\nredis_sentinel_master = \"mymaster\"\n",
        )
        .unwrap();
        let config = config.resolve().unwrap();
        assert_eq!(
            config.redis_sentinel,
            Some((
                vec![
                    "redis://10.0.0.1:26379".to_owned(),
                    "redis://10.0.0.2:26379".to_owned()
                ],
                "mymaster".to_owned()
            ))
        );
        assert_eq!(Config::default().redis_sentinel, None);
        // TLS sentinels: the CA applies to them even with a plain master URL; with neither
        // TLS, a CA is refused.
        const PEM: &str = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
        let tls = |sentinel: &str| Settings {
            redis_sentinels: Some(vec![sentinel.to_owned()]),
            redis_sentinel_master: Some("m".to_owned()),
            redis_tls_ca: Some(PEM.to_owned()),
            ..Settings::default()
        };
        let config = tls("rediss://10.0.0.1:26379").resolve().unwrap();
        assert_eq!(
            config.redis_sentinel.unwrap().0,
            ["rediss://10.0.0.1:26379"]
        );
        assert_eq!(config.redis_tls_ca.as_deref(), Some(PEM));
        let error = tls("10.0.0.1:26379").resolve().unwrap_err().to_string();
        assert!(error.contains("redis_tls_ca"), "{error}");
        for (sentinels, master, key) in [
            (
                Some(vec!["10.0.0.1:26379".to_owned()]),
                None,
                "redis_sentinel_master",
            ),
            (None, Some("mymaster".to_owned()), "redis_sentinels"),
            (
                Some(vec!["10.0.0.1".to_owned()]),
                Some("m".to_owned()),
                "redis_sentinels",
            ),
            (
                Some(vec![
                    "rediss://10.0.0.1:1".to_owned(),
                    "10.0.0.2:1".to_owned(),
                ]),
                Some("m".to_owned()),
                "redis_sentinels",
            ),
        ] {
            let error = Settings {
                redis_sentinels: sentinels,
                redis_sentinel_master: master,
                ..Settings::default()
            }
            .resolve()
            .unwrap_err()
            .to_string();
            assert!(error.contains(key), "{error}");
        }
    }

    #[test]
    fn layers_and_off() {
        let file: Settings = toml::from_str(
            "listen = \"127.0.0.1:9000\"\ntcp_echo = \"off\"\nping_interval = \"5s\"\n",
        )
        .unwrap();
        let flags = Settings {
            listen: Some("127.0.0.1:9100".into()),
            ..Settings::default()
        };
        let config = flags.or(file).resolve().unwrap();
        assert_eq!(config.listen.to_string(), "127.0.0.1:9100");
        assert_eq!(config.tcp_echo, None);
        assert_eq!(config.ping_interval, Duration::from_secs(5));
    }

    #[test]
    fn namespaces_from_toml() {
        let settings: Settings = toml::from_str(
            "[[namespaces]]\nname = \"news\"\nhistory_size = 10\nrecover = true\n\n[[namespaces]]\nname = \"secret\"\nprivate = true\n",
        )
        .unwrap();
        let config = settings.resolve().unwrap();
        let news = config.namespaces.resolve("news:1").unwrap();
        assert_eq!(
            (news.history_size, news.history_ttl.as_secs(), news.recover),
            (10, 300, true)
        );
        assert!(config.namespaces.resolve("secret:x").unwrap().private);
        assert!(
            config.namespaces.resolve("chat:x").unwrap().join_leave,
            "built-in chat stays"
        );
        let twice: Settings =
            toml::from_str("[[namespaces]]\nname = \"a\"\n[[namespaces]]\nname = \"a\"\n").unwrap();
        assert!(twice.resolve().unwrap_err().to_string().contains("twice"));
        let bad: Settings =
            toml::from_str("[[namespaces]]\nname = \"b\"\nrecover = true\n").unwrap();
        assert!(bad
            .resolve()
            .unwrap_err()
            .to_string()
            .contains("namespaces.recover"));
    }

    #[test]
    fn delta_types_and_tags_filters_from_toml() {
        let toml = |text: &str| toml::from_str::<Settings>(text).unwrap().resolve();
        let config = toml("[[namespaces]]\nname = \"p\"\nhistory_size = 1\nallowed_delta_types = [\"fossil\"]\n[[namespaces]]\nname = \"q\"\nhistory_size = 1\nallowed_delta_types = []\n").unwrap();
        assert!(config
            .namespaces
            .resolve("p:x")
            .unwrap()
            .gives_fossil_deltas());
        assert!(!config.namespaces.resolve("q:x").unwrap().fossil_delta);
        assert!(!config.namespaces.resolve("chat:x").unwrap().fossil_delta);
        assert!(config
            .namespaces
            .resolve("quotes:x")
            .unwrap()
            .gives_fossil_deltas());
        let tags = toml("[[namespaces]]\nname = \"t\"\nallow_tags_filter = true\n").unwrap();
        assert!(tags.namespaces.resolve("t:x").unwrap().allow_tags_filter);
        assert!(!tags.namespaces.resolve("chat:x").unwrap().allow_tags_filter);
        let error = toml(
            "[[namespaces]]\nname = \"p\"\nhistory_size = 1\nallowed_delta_types = [\"xdelta\"]\n",
        )
        .unwrap_err();
        assert!(
            error.to_string().contains("namespaces.allowed_delta_types"),
            "{error}"
        );
        assert!(error.to_string().contains("xdelta"), "{error}");
        let error =
            toml("[[namespaces]]\nname = \"p\"\nallowed_delta_types = [\"fossil\"]\n").unwrap_err();
        assert!(error.to_string().contains("no history"), "{error}");
    }

    #[test]
    fn recovery_modes_from_toml() {
        let toml = |text: &str| toml::from_str::<Settings>(text).unwrap().resolve();
        let config = toml("[[namespaces]]\nname = \"p\"\nhistory_size = 1\nforce_recovery = true\nforce_recovery_mode = \"cache\"\n").unwrap();
        let prices = config.namespaces.resolve("p:x").unwrap();
        assert_eq!(prices.recovery_mode, RecoveryMode::Cache);
        assert!(
            prices.recover,
            "force_recovery is Centrifugo's name for recover"
        );
        let error = toml("[[namespaces]]\nname = \"p\"\nhistory_size = 1\nrecover = false\nforce_recovery = true\n").unwrap_err();
        assert!(error.to_string().contains("force_recovery"), "{error}");
        let chat = config.namespaces.resolve("chat:x").unwrap();
        assert_eq!(chat.recovery_mode, RecoveryMode::Stream);
        let error = toml("[[namespaces]]\nname = \"p\"\nhistory_size = 1\nrecover = true\nforce_recovery_mode = \"latest\"\n").unwrap_err();
        assert!(error.to_string().contains("force_recovery_mode"), "{error}");
        let error = toml(
            "[[namespaces]]\nname = \"p\"\nhistory_size = 1\nforce_recovery_mode = \"cache\"\n",
        )
        .unwrap_err();
        assert!(error.to_string().contains("recover = true"), "{error}");
    }

    #[test]
    fn errors_name_the_key() {
        let error = toml::from_str::<Settings>("lissten = \"x\"").unwrap_err();
        assert!(error.to_string().contains("lissten"), "{error}");
        let check = |settings: Settings, key: &str| {
            let error = settings.resolve().unwrap_err().to_string();
            assert!(error.contains(key), "{error}");
        };
        check(
            Settings {
                listen: Some("nowhere".into()),
                ..Default::default()
            },
            "listen",
        );
        check(
            Settings {
                ping_interval: Some("soon".into()),
                ..Default::default()
            },
            "ping_interval",
        );
        check(
            Settings {
                tls_cert: Some("c.pem".into()),
                ..Default::default()
            },
            "tls_key",
        );
        check(
            Settings {
                log_format: Some("xml".into()),
                ..Default::default()
            },
            "log_format",
        );
        check(
            Settings {
                max_message_size: Some(0),
                ..Default::default()
            },
            "max_message_size",
        );
    }
}
