//! The Plexus server: the composition root.
//!
//! It reads nothing from the environment by itself: [`Server::bind`] takes a [`Config`], binds
//! every listener (or fails naming the one that could not be bound) and returns a
//! [`ServerHandle`] with the bound addresses, so tests start the real server on port 0.
//!
//! What lives here: configuration, listeners and connection limits, TLS, the HTTP routes, the
//! raw WebSocket and TCP transports, metrics and graceful shutdown. What does not: channel and
//! fan-out logic (`plexus-core`) and wire formats (`plexus-protocol`).

mod api;
mod app;
pub mod config;
mod emulation;
mod http;
mod jwks;
mod limits;
pub mod metrics;
mod native;
mod outbound;
mod peers;
mod poll;
mod proxy;
pub mod secrets;
mod survey;
mod tcp;
mod tls;
mod tracked;
mod wire;
mod ws;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use plexus_core::{MemoryEngine, Node};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::{Config, ConfigError, LogFormat, Settings};
pub use tls::{acceptor as tls_acceptor, TlsError};

use crate::limits::{ConnectionGuard, ConnectionLimits};
use crate::metrics::{Metrics, Refusal};
use crate::tracked::Tracked;

/// State every connection shares.
pub(crate) struct Shared {
    config: Config,
    /// The hub, the engine and the channel rules.
    node: Node,
    metrics: Metrics,
    limits: Arc<ConnectionLimits>,
    /// Cancelled once to start a graceful shutdown.
    shutdown: CancellationToken,
    /// Every connection task, so shutdown can wait for them.
    tasks: TaskTracker,
    /// Checks connection and subscription tokens.
    verifier: Option<plexus_auth::TokenVerifier>,
    /// The HMAC secret, for the guest tokens of the built-in pages.
    token_hmac_secret: String,
    /// The server API key.
    api_key: String,
    /// This node's SSE and HTTP-streaming sessions.
    emulation: emulation::Sessions,
    /// The nodes heard from, for `info`.
    peers: Arc<peers::Peers>,
    surveys: Arc<survey::Surveys>,
    /// The application's backends, where configured.
    proxies: Proxies,
    /// The identity provider's key set, if configured.
    jwks: Option<Arc<jwks::JwksSource>>,
    /// Flushers that write to parked WebSocket connections (see `ws::direct`).
    direct: ws::direct::Lanes,
    /// The WebSocket heartbeat sweep.
    heartbeats: ws::heartbeat::Heartbeats,
}

/// The application's backends (see [`proxy`]).
#[derive(Default)]
struct Proxies {
    rpc: Option<Arc<proxy::Backend>>,
    connect: Option<proxy::Backend>,
    refresh: Option<proxy::Backend>,
    subscribe: Option<proxy::Backend>,
    publish: Option<proxy::Backend>,
}

impl Proxies {
    fn new(config: &Config, metrics: &metrics::ProxyMetrics) -> Proxies {
        let backend = |name, url: &Option<String>, timeout| {
            url.as_deref().map(|url| {
                proxy::Backend::new(name, url, timeout, metrics.clone())
                    .expect("the configuration checked the URL")
            })
        };
        let timeout = config.proxy_timeout;
        Proxies {
            rpc: backend("rpc", &config.rpc_proxy_url, config.rpc_proxy_timeout).map(Arc::new),
            connect: backend("connect", &config.connect_proxy_url, timeout),
            refresh: backend("refresh", &config.refresh_proxy_url, timeout),
            subscribe: backend("subscribe", &config.subscribe_proxy_url, timeout),
            publish: backend("publish", &config.publish_proxy_url, timeout),
        }
    }

    /// Whether any backend sees the client's request headers.
    fn any(&self) -> bool {
        self.rpc.is_some()
            || self.connect.is_some()
            || self.refresh.is_some()
            || self.subscribe.is_some()
            || self.publish.is_some()
    }
}

/// A listener that could not be started.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("cannot listen on {addr} ({listener}): {source}")]
    Listen {
        listener: &'static str,
        addr: SocketAddr,
        source: io::Error,
    },
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Secrets(#[from] secrets::SecretsError),
    #[error("token key: {0}")]
    TokenKey(#[from] plexus_auth::KeyError),
    #[error("cannot open the history in {dir}: {source}")]
    Engine {
        dir: std::path::PathBuf,
        source: plexus_engine_embedded::LogError,
    },
    #[error("cannot start the redis engine: {0}")]
    Redis(#[from] plexus_engine_redis::RedisEngineError),
    #[error("cannot start the nats engine: {0}")]
    Nats(#[from] plexus_engine_nats::NatsEngineError),
}

impl BindError {
    /// Whether the address was already taken by another process.
    pub fn is_addr_in_use(&self) -> bool {
        matches!(self, BindError::Listen { source, .. } if source.kind() == io::ErrorKind::AddrInUse)
    }
}

/// How a shutdown ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Connections still open when `shutdown_timeout` ran out (they were dropped).
    pub abandoned: usize,
}

pub struct Server;

impl Server {
    /// Binds every configured listener and starts serving.
    pub async fn bind(config: Config) -> Result<ServerHandle, BindError> {
        let tls = config.tls.as_ref().map(tls::acceptor).transpose()?;
        let secrets = secrets::resolve(&config)?;
        let mut verifier = plexus_auth::TokenVerifier::new(&plexus_auth::VerifierKeys {
            hmac_secret: Some(secrets.token_hmac_secret.clone()),
            rsa_public_key_pem: config.token_rsa_public_key.clone(),
            ecdsa_public_key_pem: config.token_ecdsa_public_key.clone(),
        })?;
        let jwks = match &config.token_jwks_url {
            Some(url) => {
                let keys = plexus_auth::Jwks::default();
                verifier = verifier.with_jwks(keys.clone());
                Some(Arc::new(
                    jwks::JwksSource::new(url, keys).expect("the configuration checked the URL"),
                ))
            }
            None => None,
        };
        let listen = |listener: &'static str, addr: SocketAddr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| BindError::Listen {
                    listener,
                    addr,
                    source,
                })
        };
        let http_listener = listen("http", config.listen).await?;
        let echo_listener = match config.tcp_echo {
            Some(addr) => Some(listen("tcp_echo", addr).await?),
            None => None,
        };
        let chat_listener = match config.tcp_chat {
            Some(addr) => Some(listen("tcp_chat", addr).await?),
            None => None,
        };
        let local = |listener: &TcpListener| {
            listener
                .local_addr()
                .expect("a bound listener has an address")
        };
        let http_addr = local(&http_listener);
        let tcp_echo_addr = echo_listener.as_ref().map(local);
        let tcp_chat_addr = chat_listener.as_ref().map(local);

        let heartbeats = ws::heartbeat::Heartbeats::new(config.ping_interval, config.pong_timeout);
        let node = node(&config)?;
        let metrics = Metrics::new(node.engine().clone());
        let proxies = Proxies::new(&config, &metrics.proxies);
        let shared = Arc::new(Shared {
            limits: ConnectionLimits::new(config.max_connections, config.max_connections_per_ip),
            metrics,
            node,
            config,
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
            verifier: Some(verifier),
            api_key: secrets.api_key.clone(),
            token_hmac_secret: secrets.token_hmac_secret.clone(),
            emulation: emulation::Sessions::new(new_client_id()),
            peers: Arc::new(peers::Peers::new()),
            surveys: Arc::default(),
            proxies,
            jwks,
            heartbeats,
            direct: ws::direct::Lanes::new(
                tokio::runtime::Handle::current().metrics().num_workers(),
            ),
        });
        ws::direct::start(&shared);
        ws::heartbeat::start(&shared);
        peers::listen(&shared);
        jwks::start(&shared);
        peers::heartbeat(
            &shared,
            api::host_name().into(),
            tokio::time::Instant::now(),
        );
        let accept_loops = TaskTracker::new();
        shared.tasks.spawn(app::quotes_demo(shared.clone()));

        let router = http::router(shared.clone());
        let is_tls = tls.is_some();
        accept_loops.spawn(accept_loop(
            http_listener,
            "http",
            shared.clone(),
            move |stream, peer, guard, shared| {
                http::serve_connection(stream, peer, guard, shared, tls.clone(), router.clone())
            },
            move |stream, refusal| async move {
                // A refused TLS client gets no handshake spent on it: the socket is just closed.
                if !is_tls {
                    http::refuse_http(stream, refusal).await;
                }
            },
        ));
        if let Some(listener) = echo_listener {
            accept_loops.spawn(accept_loop(
                listener,
                "tcp_echo",
                shared.clone(),
                |stream, _peer, guard, shared| {
                    let write_timeout = shared.config.write_timeout;
                    tcp::echo(Tracked::new(stream, guard, write_timeout), shared)
                },
                http::refuse_line,
            ));
        }
        if let Some(listener) = chat_listener {
            accept_loops.spawn(accept_loop(
                listener,
                "tcp_chat",
                shared.clone(),
                |stream, _peer, guard, shared| {
                    let write_timeout = shared.config.write_timeout;
                    tcp::chat(Tracked::new(stream, guard, write_timeout), shared)
                },
                http::refuse_line,
            ));
        }
        accept_loops.close();
        Ok(ServerHandle {
            secrets,
            shared,
            accept_loops,
            http_addr,
            tcp_echo_addr,
            tcp_chat_addr,
            is_tls,
        })
    }
}

/// A running server.
pub struct ServerHandle {
    secrets: secrets::Secrets,
    shared: Arc<Shared>,
    accept_loops: TaskTracker,
    http_addr: SocketAddr,
    tcp_echo_addr: Option<SocketAddr>,
    tcp_chat_addr: Option<SocketAddr>,
    is_tls: bool,
}

impl ServerHandle {
    /// The HTTP and WebSocket listener's address.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    pub fn tcp_echo_addr(&self) -> Option<SocketAddr> {
        self.tcp_echo_addr
    }

    pub fn tcp_chat_addr(&self) -> Option<SocketAddr> {
        self.tcp_chat_addr
    }

    /// Whether the main listener speaks TLS (https, wss).
    pub fn is_tls(&self) -> bool {
        self.is_tls
    }

    /// The engine's name (`embedded`, `memory`).
    pub fn engine(&self) -> &'static str {
        self.shared.node.engine().name()
    }

    pub fn config(&self) -> &Config {
        &self.shared.config
    }

    /// The API key and token secret in use, and where they are kept.
    pub fn secrets(&self) -> &secrets::Secrets {
        &self.secrets
    }

    /// The Prometheus text of the server's metrics.
    pub fn metrics_text(&self) -> String {
        self.shared
            .metrics
            .render(self.shared.node.hub().fan_out_totals().0)
    }

    /// Stops accepting, asks every connection to close (WebSocket 1001, a goodbye line on
    /// TCP) and waits up to `shutdown_timeout` for them.
    pub async fn shutdown(self) -> ShutdownReport {
        self.shared.shutdown.cancel();
        self.accept_loops.wait().await;
        self.shared.tasks.close();
        let timeout = self.shared.config.shutdown_timeout;
        let finished = tokio::time::timeout(timeout, self.shared.tasks.wait()).await;
        ShutdownReport {
            abandoned: if finished.is_ok() {
                0
            } else {
                self.shared.tasks.len()
            },
        }
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.shared.shutdown.cancel();
    }
}

/// `EMFILE` and `ENFILE`: the process or the system ran out of file descriptors.
fn is_out_of_files(error: &io::Error) -> bool {
    matches!(error.raw_os_error(), Some(23 | 24))
}

async fn accept_loop<Serve, ServeFuture, Refuse, RefuseFuture>(
    listener: TcpListener,
    name: &'static str,
    shared: Arc<Shared>,
    serve: Serve,
    refuse: Refuse,
) where
    Serve: Fn(TcpStream, SocketAddr, ConnectionGuard, Arc<Shared>) -> ServeFuture,
    ServeFuture: Future<Output = ()> + Send + 'static,
    Refuse: Fn(TcpStream, Refusal) -> RefuseFuture,
    RefuseFuture: Future<Output = ()> + Send + 'static,
{
    let mut last_fd_warning: Option<tokio::time::Instant> = None;
    loop {
        let accepted = tokio::select! {
            () = shared.shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                match shared.limits.try_acquire(peer.ip()) {
                    Ok(guard) => {
                        shared
                            .tasks
                            .spawn(serve(stream, peer, guard, shared.clone()));
                    }
                    Err(refusal) => {
                        shared.metrics.refused(refusal);
                        tracing::debug!(%peer, listener = name, reason = refusal.as_str(), "connection refused");
                        shared.tasks.spawn(refuse(stream, refusal));
                    }
                }
            }
            Err(error) if is_out_of_files(&error) => {
                // Keep the listener; back off so pending connections wait in the backlog
                // until descriptors free up.
                let now = tokio::time::Instant::now();
                if last_fd_warning.is_none_or(|last| now - last > Duration::from_secs(5)) {
                    tracing::warn!(listener = name, %error, "out of file descriptors; accepting more slowly");
                    last_fd_warning = Some(now);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(error) => {
                tracing::debug!(listener = name, %error, "accept failed");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    }
}

/// The node, with the configured engine.
fn node(config: &Config) -> Result<Node, BindError> {
    let namespaces = config.namespaces.clone();
    match config.engine {
        config::EngineKind::Memory => Ok(Node::new(namespaces, |deliver| {
            Arc::new(MemoryEngine::new(deliver))
        })),
        config::EngineKind::Embedded => Node::try_new(namespaces, |deliver| {
            let engine = plexus_engine_embedded::EmbeddedEngine::open(&config.data_dir, deliver)
                .map_err(|source| BindError::Engine {
                    dir: config.data_dir.clone(),
                    source,
                })?;
            Ok(Arc::new(engine) as Arc<dyn plexus_core::Engine>)
        }),
        // Connects in the background: a Redis that is down at start is waited for (calls fail
        // as unavailable meanwhile, and `Engine::ready` is false) rather than fatal.
        config::EngineKind::Redis => Node::try_new(namespaces, |deliver| {
            let options = plexus_engine_redis::RedisOptions {
                tls_ca: config.redis_tls_ca.clone().map(String::into_bytes),
                tls_client: pem_pair(&config.redis_tls_client),
                sentinel: config.redis_sentinel.clone(),
                cluster: config.redis_cluster.clone(),
                sharded_pubsub: config.redis_cluster_sharded_pubsub,
                ..plexus_engine_redis::RedisOptions::new(&config.redis_url, &config.redis_prefix)
            };
            let engine = plexus_engine_redis::RedisEngine::new(options, deliver)?;
            Ok(Arc::new(engine) as Arc<dyn plexus_core::Engine>)
        }),
        // Likewise: a NATS that is down at start is waited for.
        config::EngineKind::Nats => Node::try_new(namespaces, |deliver| {
            let options = plexus_engine_nats::NatsOptions {
                tls_ca: config.nats_tls_ca.clone().map(String::into_bytes),
                tls_client: pem_pair(&config.nats_tls_client),
                ..plexus_engine_nats::NatsOptions::new(&config.nats_url, &config.nats_prefix)
            };
            let engine = plexus_engine_nats::NatsEngine::new(options, deliver)?;
            Ok(Arc::new(engine) as Arc<dyn plexus_core::Engine>)
        }),
    }
}

/// A certificate and key as the engines take them.
fn pem_pair(pair: &Option<(String, String)>) -> Option<(Vec<u8>, Vec<u8>)> {
    pair.as_ref()
        .map(|(cert, key)| (cert.clone().into_bytes(), key.clone().into_bytes()))
}

/// A new client id, unique across nodes (a random UUID).
pub(crate) fn new_client_id() -> Arc<str> {
    uuid::Uuid::new_v4().to_string().into()
}

/// Raises the soft open-files limit to the hard limit; returns (before, after).
pub fn raise_open_files_limit() -> io::Result<(u64, u64)> {
    let (soft, hard) = rlimit::Resource::NOFILE.get()?;
    if soft < hard {
        rlimit::Resource::NOFILE.set(hard, hard)?;
    }
    Ok((soft, rlimit::Resource::NOFILE.get()?.0))
}
