//! `conns`: open N idle connections at a ramp rate, hold them, close them.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use crate::client::{close, interpret, preflight, Endpoint, Failures, OpenError, Received};
use crate::latency::{Latencies, LatencySummary};
use crate::progress::{Progress, ProgressMode};
use crate::rate::Rate;
use crate::system::{fd_soft_limit, rss_kib};
use crate::{check_count, check_duration, seconds, write_failures, BenchError, FdLimitReached};

#[derive(Debug, Clone)]
pub struct ConnsOptions {
    pub endpoint: Endpoint,
    pub count: u64,
    /// How long to hold the connections once they are all open.
    pub duration: Duration,
    /// How fast to open them.
    pub ramp: Rate,
    /// The server's pid, to sample its RSS before and after.
    pub server_pid: Option<u32>,
    pub progress: ProgressMode,
}

impl ConnsOptions {
    /// Opening at the ramp rate, the hold, and a minute to spare.
    pub fn default_time_limit(&self) -> Duration {
        self.ramp.span_of(self.count) + self.duration + Duration::from_secs(60)
    }
}

/// What `conns` measured; see the crate docs for the JSON form.
#[derive(Debug, Clone, Serialize)]
pub struct ConnsReport {
    pub bench: &'static str,
    pub url: String,
    pub protocol: &'static str,
    pub requested: u64,
    pub attempted: u64,
    pub connected: u64,
    pub failed: u64,
    pub dropped: u64,
    pub held: u64,
    pub hold_s: f64,
    pub sources: u32,
    pub failures: BTreeMap<String, u64>,
    pub fd_limit: Option<FdLimitReached>,
    pub connect_latency_us: LatencySummary,
    pub server_rss_kib: Option<RssReport>,
    pub elapsed_s: f64,
}

/// The server's resident memory before the first connection and with all of them open.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct RssReport {
    pub before: u64,
    pub after: u64,
    /// `(after − before) / connections held`, one decimal.
    pub per_connection_kib: f64,
}

impl RssReport {
    pub fn new(before: u64, after: u64, connections: u64) -> RssReport {
        let per_connection_kib = if connections == 0 {
            0.0
        } else {
            ((after as f64 - before as f64) / connections as f64 * 10.0).round() / 10.0
        };
        RssReport {
            before,
            after,
            per_connection_kib,
        }
    }
}

#[derive(Default)]
struct Shared {
    attempted: AtomicU64,
    connected: AtomicU64,
    failed: AtomicU64,
    open: AtomicU64,
    dropped: AtomicU64,
    fd_limit_hit: AtomicBool,
    failures: Failures,
    latencies: Latencies,
}

impl Shared {
    fn settled(&self) -> bool {
        self.connected.load(Relaxed) + self.failed.load(Relaxed) >= self.attempted.load(Relaxed)
    }
}

/// Opens `count` connections at `ramp`, holds them for `duration`, closes them, and reports.
pub async fn conns(options: ConnsOptions) -> Result<ConnsReport, BenchError> {
    check_count("--count", options.count, crate::MAX_CONNECTIONS)?;
    check_duration("--duration", options.duration)?;
    preflight(&options.endpoint).await?;
    let rss_before = options.server_pid.map(rss_kib).transpose()?;

    let start = Instant::now();
    let shared = Arc::new(Shared::default());
    let endpoint = Arc::new(options.endpoint.clone());
    let cancel = CancellationToken::new();
    let holding_since = Arc::new(std::sync::OnceLock::<Instant>::new());
    let progress = {
        let shared = shared.clone();
        let holding_since = holding_since.clone();
        let (count, hold) = (options.count, options.duration);
        Progress::start(options.progress, move || {
            let phase = match holding_since.get() {
                Some(since) => format!(
                    "holding {:.0}s/{:.0}s",
                    since.elapsed().as_secs_f64().min(hold.as_secs_f64()),
                    hold.as_secs_f64()
                ),
                None => "opening".to_owned(),
            };
            format!(
                "conns: {}/{count} open, {} failed, {} dropped, {phase}, {:.1}s",
                shared.open.load(Relaxed),
                shared.failed.load(Relaxed),
                shared.dropped.load(Relaxed),
                start.elapsed().as_secs_f64()
            )
        })
    };

    let mut tasks = JoinSet::new();
    let mut fd_limit = None;
    for index in 0..options.count {
        tokio::time::sleep_until((start + options.ramp.due(index)).into()).await;
        if shared.fd_limit_hit.load(Relaxed) {
            break;
        }
        shared.attempted.fetch_add(1, Relaxed);
        tasks.spawn(hold_one(
            index,
            endpoint.clone(),
            shared.clone(),
            cancel.clone(),
        ));
        while tasks.try_join_next().is_some() {}
    }
    // Wait for the attempts under way.
    while !shared.settled() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if shared.fd_limit_hit.load(Relaxed) {
        let reached = FdLimitReached {
            limit: fd_soft_limit(),
            opened: shared.open.load(Relaxed),
        };
        eprintln!("plexus bench: {reached}");
        fd_limit = Some(reached);
    }

    let hold_start = Instant::now();
    let _ = holding_since.set(hold_start);
    tokio::time::sleep(options.duration).await;
    let held = shared.open.load(Relaxed);
    let rss = match (options.server_pid, rss_before) {
        (Some(pid), Some(before)) => Some(RssReport::new(before, rss_kib(pid)?, held)),
        _ => None,
    };
    let hold = hold_start.elapsed();
    cancel.cancel();
    while tasks.join_next().await.is_some() {}
    progress.finish().await;

    Ok(ConnsReport {
        bench: "conns",
        url: options.endpoint.target.url.clone(),
        protocol: options.endpoint.protocol.name(),
        requested: options.count,
        attempted: shared.attempted.load(Relaxed),
        connected: shared.connected.load(Relaxed),
        failed: shared.failed.load(Relaxed),
        dropped: shared.dropped.load(Relaxed),
        held,
        hold_s: seconds(hold),
        sources: options
            .endpoint
            .sources
            .map_or(0, |sources| sources.count()),
        failures: shared.failures.snapshot(),
        fd_limit,
        connect_latency_us: shared.latencies.summary(),
        server_rss_kib: rss,
        elapsed_s: seconds(start.elapsed()),
    })
}

/// One connection: open it, keep reading (so pings are answered) until cancelled, close it.
async fn hold_one(
    index: u64,
    endpoint: Arc<Endpoint>,
    shared: Arc<Shared>,
    cancel: CancellationToken,
) {
    let started = Instant::now();
    let mut ws = match endpoint.open(index).await {
        Ok(ws) => ws,
        Err(error) => {
            if error.is_fd_limit() {
                shared.fd_limit_hit.store(true, Relaxed);
            }
            shared.failures.add(error.reason());
            shared.failed.fetch_add(1, Relaxed);
            return;
        }
    };
    shared.latencies.record(index, started.elapsed());
    shared.open.fetch_add(1, Relaxed);
    shared.connected.fetch_add(1, Relaxed);
    let ended = loop {
        tokio::select! {
            () = cancel.cancelled() => break None,
            message = ws.next() => match message {
                Some(Ok(message)) => match interpret(&endpoint.protocol, &message) {
                    Received::Ping => {
                        if let Err(error) = ws.send(Message::text("{}")).await {
                            break Some(OpenError::from_ws(error).reason());
                        }
                    }
                    Received::Closed(code, reason) => {
                        break Some(OpenError::Closed(code, reason).reason())
                    }
                    Received::Stamps { ping: true, .. } => {
                        if let Err(error) = ws.send(Message::text("{}")).await {
                            break Some(OpenError::from_ws(error).reason());
                        }
                    }
                    Received::Stamps { .. } | Received::Other => {}
                },
                Some(Err(error)) => break Some(OpenError::from_ws(error).reason()),
                None => break Some("connection closed".to_owned()),
            },
        }
    };
    shared.open.fetch_sub(1, Relaxed);
    match ended {
        None => {
            close(ws, Duration::from_secs(3)).await;
        }
        Some(reason) => {
            shared.dropped.fetch_add(1, Relaxed);
            shared.failures.add(format!("dropped: {reason}"));
        }
    }
}

impl fmt::Display for ConnsReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "conns {} ({})", self.url, self.protocol)?;
        writeln!(
            f,
            "  connected {}/{} ({} attempted, {} failed), {} held for {:.1}s, {} dropped",
            self.connected,
            self.requested,
            self.attempted,
            self.failed,
            self.held,
            self.hold_s,
            self.dropped
        )?;
        writeln!(f, "  connect latency: {}", self.connect_latency_us)?;
        if let Some(rss) = &self.server_rss_kib {
            writeln!(
                f,
                "  server RSS: {} KiB before, {} KiB after: {:.1} KiB per connection",
                rss.before, rss.after, rss.per_connection_kib
            )?;
        }
        if let Some(reached) = &self.fd_limit {
            writeln!(f, "  {reached}")?;
        }
        if !self.failures.is_empty() {
            writeln!(f, "  failures:")?;
            write_failures(f, &self.failures)?;
        }
        write!(
            f,
            "  {} source addresses, {:.1}s in all",
            self.sources, self.elapsed_s
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rss_per_connection() {
        assert_eq!(
            RssReport::new(10_000, 30_000, 1000).per_connection_kib,
            20.0
        );
        assert_eq!(RssReport::new(10_000, 10_500, 3).per_connection_kib, 166.7);
        assert_eq!(RssReport::new(10_000, 9_000, 100).per_connection_kib, -10.0);
        assert_eq!(RssReport::new(10_000, 30_000, 0).per_connection_kib, 0.0);
    }
}
