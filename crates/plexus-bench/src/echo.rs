//! `echo`: round trips on `/echo`, `inflight` messages at a time on each connection.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use crate::client::{close, preflight, Endpoint, Failures, OpenError, Ws};
use crate::latency::{Latencies, LatencySummary};
use crate::progress::{Progress, ProgressMode};
use crate::rate::Rate;
use crate::seq::{parse_stamp, stamp_message};
use crate::system::fd_soft_limit;
use crate::{
    check_count, check_duration, per_second, seconds, write_failures, BenchError, FdLimitReached,
};

/// The most connections of one echo run.
pub const MAX_ECHO_CONNECTIONS: u64 = 100_000;
/// The most messages in flight on one connection.
pub const MAX_INFLIGHT: u64 = 1000;

#[derive(Debug, Clone)]
pub struct EchoOptions {
    pub endpoint: Endpoint,
    pub connections: u64,
    pub duration: Duration,
    pub size: usize,
    /// Messages in flight on each connection.
    pub inflight: u64,
    pub ramp: Rate,
    pub progress: ProgressMode,
}

impl EchoOptions {
    pub fn default_time_limit(&self) -> Duration {
        self.ramp.span_of(self.connections) + self.duration + Duration::from_secs(60)
    }
}

/// What `echo` measured; see the crate docs for the JSON form.
#[derive(Debug, Clone, Serialize)]
pub struct EchoReport {
    pub bench: &'static str,
    pub url: String,
    pub connections: u64,
    pub connected: u64,
    pub failed: u64,
    pub dropped: u64,
    pub inflight: u64,
    pub size: usize,
    pub duration_s: f64,
    pub round_trips: u64,
    pub round_trips_per_s: f64,
    pub unreadable: u64,
    pub latency_us: LatencySummary,
    pub failures: BTreeMap<String, u64>,
    pub fd_limit: Option<FdLimitReached>,
    pub elapsed_s: f64,
}

struct Shared {
    epoch: Instant,
    connected: AtomicU64,
    failed: AtomicU64,
    dropped: AtomicU64,
    round_trips: AtomicU64,
    unreadable: AtomicU64,
    fd_limit_hit: AtomicBool,
    failures: Failures,
    latencies: Latencies,
    /// Set when every connection is open: round trips count from then until `deadline`.
    deadline: OnceLock<Instant>,
}

impl Shared {
    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

pub async fn echo(options: EchoOptions) -> Result<EchoReport, BenchError> {
    check_count("--connections", options.connections, MAX_ECHO_CONNECTIONS)?;
    check_count("--inflight", options.inflight, MAX_INFLIGHT)?;
    check_duration("--duration", options.duration)?;
    if options.size > crate::MAX_SIZE {
        return Err(BenchError::Usage(format!(
            "--size must be at most {}",
            crate::MAX_SIZE
        )));
    }
    preflight(&options.endpoint).await?;
    let shared = Arc::new(Shared {
        epoch: Instant::now(),
        connected: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        dropped: AtomicU64::new(0),
        round_trips: AtomicU64::new(0),
        unreadable: AtomicU64::new(0),
        fd_limit_hit: AtomicBool::new(false),
        failures: Failures::default(),
        latencies: Latencies::new(),
        deadline: OnceLock::new(),
    });
    let start = shared.epoch;
    let progress = {
        let shared = shared.clone();
        let connections = options.connections;
        Progress::start(options.progress, move || {
            format!(
                "echo: {}/{connections} connected, {} failed, {} round trips, {:.1}s",
                shared.connected.load(Relaxed),
                shared.failed.load(Relaxed),
                shared.round_trips.load(Relaxed),
                start.elapsed().as_secs_f64()
            )
        })
    };

    let endpoint = Arc::new(options.endpoint.clone());
    let go = CancellationToken::new();
    let stop = CancellationToken::new();
    let mut tasks = JoinSet::new();
    let mut attempted = 0;
    for index in 0..options.connections {
        tokio::time::sleep_until((start + options.ramp.due(index)).into()).await;
        if shared.fd_limit_hit.load(Relaxed) {
            break;
        }
        attempted += 1;
        tasks.spawn(echo_one(
            index,
            endpoint.clone(),
            shared.clone(),
            options.clone(),
            go.clone(),
            stop.clone(),
        ));
    }
    while shared.connected.load(Relaxed) + shared.failed.load(Relaxed) < attempted {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let fd_limit = shared.fd_limit_hit.load(Relaxed).then(|| {
        let reached = FdLimitReached {
            limit: fd_soft_limit(),
            opened: shared.connected.load(Relaxed),
        };
        eprintln!("plexus bench: {reached}");
        reached
    });

    let measure_start = Instant::now();
    let deadline = measure_start + options.duration;
    let _ = shared.deadline.set(deadline);
    go.cancel();
    tokio::time::sleep_until(deadline.into()).await;
    // Replies still in flight get a moment; then everyone stops.
    let finished = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(Duration::from_secs(2), finished)
        .await
        .is_err()
    {
        stop.cancel();
        while tasks.join_next().await.is_some() {}
    }
    progress.finish().await;

    let round_trips = shared.round_trips.load(Relaxed);
    Ok(EchoReport {
        bench: "echo",
        url: options.endpoint.target.url.clone(),
        connections: options.connections,
        connected: shared.connected.load(Relaxed),
        failed: shared.failed.load(Relaxed),
        dropped: shared.dropped.load(Relaxed),
        inflight: options.inflight,
        size: options.size,
        duration_s: seconds(options.duration),
        round_trips,
        round_trips_per_s: per_second(round_trips, options.duration),
        unreadable: shared.unreadable.load(Relaxed),
        latency_us: shared.latencies.summary(),
        failures: shared.failures.snapshot(),
        fd_limit,
        elapsed_s: seconds(start.elapsed()),
    })
}

async fn echo_one(
    index: u64,
    endpoint: Arc<Endpoint>,
    shared: Arc<Shared>,
    options: EchoOptions,
    go: CancellationToken,
    stop: CancellationToken,
) {
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
    shared.connected.fetch_add(1, Relaxed);
    tokio::select! {
        () = go.cancelled() => {}
        () = stop.cancelled() => return,
    }
    let deadline = *shared.deadline.get().expect("set before go");
    match round_trips(index, &mut ws, &shared, &options, deadline, &stop).await {
        Ok(()) => {
            close(ws, Duration::from_secs(2)).await;
        }
        Err(reason) => {
            shared.dropped.fetch_add(1, Relaxed);
            shared.failures.add(format!("dropped: {reason}"));
        }
    }
}

async fn round_trips(
    index: u64,
    ws: &mut Ws,
    shared: &Shared,
    options: &EchoOptions,
    deadline: Instant,
    stop: &CancellationToken,
) -> Result<(), String> {
    let broken = |error| OpenError::from_ws(error).reason();
    let mut seq = 0;
    for _ in 0..options.inflight {
        seq += 1;
        ws.send(Message::text(stamp_message(
            seq,
            shared.now(),
            options.size,
        )))
        .await
        .map_err(broken)?;
    }
    let mut outstanding = options.inflight;
    while outstanding > 0 {
        let message = tokio::select! {
            () = stop.cancelled() => return Ok(()),
            message = ws.next() => message,
        };
        let text = match message {
            Some(Ok(Message::Text(text))) => text,
            Some(Ok(Message::Close(frame))) => {
                let (code, reason) = frame.map_or((1005, String::new()), |frame| {
                    (u16::from(frame.code), frame.reason.to_string())
                });
                return Err(OpenError::Closed(code, reason).reason());
            }
            Some(Ok(_)) => continue,
            Some(Err(error)) => return Err(broken(error)),
            None => return Err("connection closed".into()),
        };
        outstanding -= 1;
        let received = Instant::now();
        let now = shared.now();
        match parse_stamp(&text) {
            Some(stamp) if received <= deadline => {
                shared
                    .latencies
                    .record(index, Duration::from_nanos(now.saturating_sub(stamp.t)));
                shared.round_trips.fetch_add(1, Relaxed);
            }
            Some(_) => {} // after the deadline: not counted
            None => {
                shared.unreadable.fetch_add(1, Relaxed);
            }
        }
        if received < deadline {
            seq += 1;
            ws.send(Message::text(stamp_message(
                seq,
                shared.now(),
                options.size,
            )))
            .await
            .map_err(broken)?;
            outstanding += 1;
        }
    }
    Ok(())
}

impl fmt::Display for EchoReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "echo {}", self.url)?;
        writeln!(
            f,
            "  connections {}/{} ({} failed, {} dropped), {} in flight each, {} bytes",
            self.connected, self.connections, self.failed, self.dropped, self.inflight, self.size
        )?;
        writeln!(
            f,
            "  round trips {} in {:.1}s: {:.1}/s ({} unreadable)",
            self.round_trips, self.duration_s, self.round_trips_per_s, self.unreadable
        )?;
        writeln!(f, "  latency: {}", self.latency_us)?;
        if let Some(reached) = &self.fd_limit {
            writeln!(f, "  {reached}")?;
        }
        if !self.failures.is_empty() {
            writeln!(f, "  failures:")?;
            write_failures(f, &self.failures)?;
        }
        write!(f, "  {:.1}s in all", self.elapsed_s)
    }
}
