//! Prometheus metrics, served at `/metrics`.
//!
//! Counters are created once at start-up and cloned into connections as plain atomics, so the
//! hot path never looks a label set up.

use std::sync::Arc;

use plexus_core::{Engine, MetricKind};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TransportLabel {
    transport: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabel {
    code: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProxyLabel {
    proxy: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProxyOutcomeLabel {
    proxy: &'static str,
    outcome: &'static str,
}

/// Calls to the application's backends (see `proxy`), by proxy.
#[derive(Debug, Clone, Default)]
pub(crate) struct ProxyMetrics {
    calls: Family<ProxyOutcomeLabel, Counter>,
    seconds: Family<ProxyLabel, Counter<f64, std::sync::atomic::AtomicU64>>,
}

impl ProxyMetrics {
    /// One call to `proxy` took `elapsed` and ended in `outcome`: `result`, `error`,
    /// `disconnect` (the backend's answers) or `failed` (no usable answer).
    pub(crate) fn call(&self, proxy: &'static str, outcome: &'static str, elapsed: f64) {
        self.calls
            .get_or_create(&ProxyOutcomeLabel { proxy, outcome })
            .inc();
        self.seconds
            .get_or_create(&ProxyLabel { proxy })
            .inc_by(elapsed);
    }
}

/// The counters of one transport.
#[derive(Debug, Clone, Default)]
pub struct TransportMetrics {
    pub connections: Gauge,
    pub accepted: Counter,
    pub messages_in: Counter,
    pub messages_out: Counter,
    pub bytes_in: Counter,
    pub bytes_out: Counter,
}

/// Why a connection or request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `max_connections` reached.
    ServerFull,
    /// `max_connections_per_ip` reached.
    AddressFull,
    /// Not a valid WebSocket upgrade request.
    BadUpgrade,
    /// TLS handshake or request head not finished within `handshake_timeout`.
    HandshakeTimeout,
    /// TLS handshake failed.
    TlsFailed,
    /// A browser `Origin` not in `allowed_origins`.
    BadOrigin,
}

impl Refusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::ServerFull => "server_full",
            Refusal::AddressFull => "address_full",
            Refusal::BadUpgrade => "bad_upgrade",
            Refusal::HandshakeTimeout => "handshake_timeout",
            Refusal::TlsFailed => "tls_failed",
            Refusal::BadOrigin => "bad_origin",
        }
    }
}

pub struct Metrics {
    registry: Registry,
    pub websocket: TransportMetrics,
    pub tcp_echo: TransportMetrics,
    pub tcp_chat: TransportMetrics,
    refused: Family<ReasonLabel, Counter>,
    websocket_closes: Family<CodeLabel, Counter>,
    pub publications: Counter,
    /// Set from the hub's own total when rendered.
    deliveries: Counter,
    pub slow_disconnects: Counter,
    pub rate_limited: Counter,
    pub(crate) proxies: ProxyMetrics,
    /// Serialises renders, which move `deliveries` up to the hub's total.
    render_lock: std::sync::Mutex<()>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("Metrics")
    }
}

/// Reads the engine's own numbers ([`Engine::metrics`]) at each scrape, and whether it is
/// ready.
struct EngineCollector(Arc<dyn Engine>);

impl std::fmt::Debug for EngineCollector {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("EngineCollector")
    }
}

impl Collector for EngineCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let ready = ConstGauge::new(i64::from(self.0.ready()));
        let help = "1 while the engine can take publications (the same as /ready)";
        describe(&mut encoder, "engine_ready", help, &ready)?;
        for metric in self.0.metrics() {
            let (name, help, value) = (metric.name, metric.help, metric.value);
            // Whole numbers are written as such (`3`, not `3.0`).
            let whole = value.fract() == 0.0 && value.abs() < 9e15;
            match metric.kind {
                MetricKind::Counter if whole => {
                    describe(&mut encoder, name, help, &ConstCounter::new(value as u64))
                }
                MetricKind::Gauge if whole => {
                    describe(&mut encoder, name, help, &ConstGauge::new(value as i64))
                }
                MetricKind::Counter => {
                    describe(&mut encoder, name, help, &ConstCounter::new(value))
                }
                MetricKind::Gauge => describe(&mut encoder, name, help, &ConstGauge::new(value)),
            }?;
        }
        Ok(())
    }
}

fn describe(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    metric: &impl EncodeMetric,
) -> Result<(), std::fmt::Error> {
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
}

impl Metrics {
    /// The server's metrics, with `engine`'s own read at each scrape.
    pub fn new(engine: Arc<dyn Engine>) -> Metrics {
        let mut registry = Registry::with_prefix("plexus");
        let connections = Family::<TransportLabel, Gauge>::default();
        let accepted = Family::<TransportLabel, Counter>::default();
        let messages_in = Family::<TransportLabel, Counter>::default();
        let messages_out = Family::<TransportLabel, Counter>::default();
        let bytes_in = Family::<TransportLabel, Counter>::default();
        let bytes_out = Family::<TransportLabel, Counter>::default();
        let transport = |name: &str| {
            let label = TransportLabel {
                transport: name.to_owned(),
            };
            TransportMetrics {
                connections: connections.get_or_create(&label).clone(),
                accepted: accepted.get_or_create(&label).clone(),
                messages_in: messages_in.get_or_create(&label).clone(),
                messages_out: messages_out.get_or_create(&label).clone(),
                bytes_in: bytes_in.get_or_create(&label).clone(),
                bytes_out: bytes_out.get_or_create(&label).clone(),
            }
        };
        let (websocket, tcp_echo, tcp_chat) = (
            transport("websocket"),
            transport("tcp_echo"),
            transport("tcp_chat"),
        );
        registry.register("connections", "Open connections", connections);
        registry.register("connections_accepted", "Connections accepted", accepted);
        registry.register(
            "messages_received",
            "Messages received from clients",
            messages_in,
        );
        registry.register("messages_sent", "Messages sent to clients", messages_out);
        registry.register("bytes_received", "Bytes received from clients", bytes_in);
        registry.register("bytes_sent", "Bytes sent to clients", bytes_out);
        let refused = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "refused",
            "Connections and upgrades refused, by reason",
            refused.clone(),
        );
        let websocket_closes = Family::<CodeLabel, Counter>::default();
        registry.register(
            "websocket_closes",
            "WebSocket connections closed by the server, by close code",
            websocket_closes.clone(),
        );
        let publications = Counter::default();
        registry.register(
            "publications",
            "Publications fanned out by the hub",
            publications.clone(),
        );
        let deliveries = Counter::default();
        registry.register(
            "deliveries",
            "Publications queued to subscribers",
            deliveries.clone(),
        );
        let slow_disconnects = Counter::default();
        registry.register(
            "slow_disconnects",
            "Connections cut because their outbox overflowed",
            slow_disconnects.clone(),
        );
        let rate_limited = Counter::default();
        registry.register(
            "messages_rate_limited",
            "Messages refused because their connection was over max_messages_per_second",
            rate_limited.clone(),
        );
        let proxies = ProxyMetrics::default();
        registry.register(
            "proxy_calls",
            "Calls to the application's backends, by proxy and outcome (result, error, disconnect: the backend's answers; failed: none usable)",
            proxies.calls.clone(),
        );
        registry.register(
            "proxy_call_seconds",
            "Time spent waiting for the application's backends, by proxy (mean latency: its rate over the calls' rate)",
            proxies.seconds.clone(),
        );
        registry.register_collector(Box::new(EngineCollector(engine)));
        Metrics {
            registry,
            websocket,
            tcp_echo,
            tcp_chat,
            refused,
            websocket_closes,
            publications,
            deliveries,
            slow_disconnects,
            rate_limited,
            proxies,
            render_lock: std::sync::Mutex::new(()),
        }
    }

    pub fn refused(&self, refusal: Refusal) {
        self.refused
            .get_or_create(&ReasonLabel {
                reason: refusal.as_str().to_owned(),
            })
            .inc();
    }

    pub fn websocket_closed(&self, code: u16) {
        self.websocket_closes
            .get_or_create(&CodeLabel {
                code: code.to_string(),
            })
            .inc();
    }

    /// The Prometheus text exposition of every metric; `deliveries_total` is the hub's count of
    /// deliveries queued to subscribers.
    pub fn render(&self, deliveries_total: u64) -> String {
        let _guard = self.render_lock.lock().unwrap_or_else(|p| p.into_inner());
        let seen = self.deliveries.get();
        if deliveries_total > seen {
            self.deliveries.inc_by(deliveries_total - seen);
        }
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}
