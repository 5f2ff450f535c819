//! `churn`: connect/close cycles at a fixed rate.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::task::JoinSet;

use crate::client::{close, preflight, Endpoint, Failures};
use crate::latency::{Latencies, LatencySummary};
use crate::progress::{Progress, ProgressMode};
use crate::rate::Rate;
use crate::system::fd_soft_limit;
use crate::{check_duration, seconds, write_failures, BenchError, FdLimitReached};

/// Cycles allowed under way at once; past it a due cycle is skipped and counted as a failure.
pub const MAX_IN_FLIGHT: u64 = 10_000;

#[derive(Debug, Clone)]
pub struct ChurnOptions {
    pub endpoint: Endpoint,
    pub rate: Rate,
    pub duration: Duration,
    pub progress: ProgressMode,
}

impl ChurnOptions {
    pub fn default_time_limit(&self) -> Duration {
        self.duration + Duration::from_secs(60)
    }
}

/// What `churn` measured; see the crate docs for the JSON form.
#[derive(Debug, Clone, Serialize)]
pub struct ChurnReport {
    pub bench: &'static str,
    pub url: String,
    pub protocol: &'static str,
    pub rate: String,
    pub duration_s: f64,
    pub attempted: u64,
    pub succeeded: u64,
    pub failed: u64,
    pub connect_latency_us: LatencySummary,
    pub failures: BTreeMap<String, u64>,
    pub fd_limit: Option<FdLimitReached>,
    pub elapsed_s: f64,
}

#[derive(Default)]
struct Shared {
    attempted: AtomicU64,
    in_flight: AtomicU64,
    succeeded: AtomicU64,
    failed: AtomicU64,
    fd_limit_hit: AtomicBool,
    failures: Failures,
    latencies: Latencies,
}

pub async fn churn(options: ChurnOptions) -> Result<ChurnReport, BenchError> {
    check_duration("--duration", options.duration)?;
    preflight(&options.endpoint).await?;
    let start = Instant::now();
    let shared = Arc::new(Shared::default());
    let planned = options.rate.events_in(options.duration);
    let progress = {
        let shared = shared.clone();
        Progress::start(options.progress, move || {
            format!(
                "churn: {}/{planned} cycles, {} ok, {} failed, {} under way, {:.1}s",
                shared.attempted.load(Relaxed),
                shared.succeeded.load(Relaxed),
                shared.failed.load(Relaxed),
                shared.in_flight.load(Relaxed),
                start.elapsed().as_secs_f64()
            )
        })
    };
    let endpoint = Arc::new(options.endpoint.clone());
    let mut tasks = JoinSet::new();
    for index in 0..planned {
        tokio::time::sleep_until((start + options.rate.due(index)).into()).await;
        while tasks.try_join_next().is_some() {}
        if shared.fd_limit_hit.load(Relaxed) {
            break;
        }
        shared.attempted.fetch_add(1, Relaxed);
        if shared.in_flight.load(Relaxed) >= MAX_IN_FLIGHT {
            shared.failed.fetch_add(1, Relaxed);
            shared
                .failures
                .add(format!("skipped: {MAX_IN_FLIGHT} cycles already under way"));
            continue;
        }
        shared.in_flight.fetch_add(1, Relaxed);
        tasks.spawn(cycle(index, endpoint.clone(), shared.clone()));
    }
    while tasks.join_next().await.is_some() {}
    progress.finish().await;
    let fd_limit = shared.fd_limit_hit.load(Relaxed).then(|| {
        let reached = FdLimitReached {
            limit: fd_soft_limit(),
            opened: shared.succeeded.load(Relaxed),
        };
        eprintln!("plexus bench: {reached}");
        reached
    });
    Ok(ChurnReport {
        bench: "churn",
        url: options.endpoint.target.url.clone(),
        protocol: options.endpoint.protocol.name(),
        rate: options.rate.to_string(),
        duration_s: seconds(options.duration),
        attempted: shared.attempted.load(Relaxed),
        succeeded: shared.succeeded.load(Relaxed),
        failed: shared.failed.load(Relaxed),
        connect_latency_us: shared.latencies.summary(),
        failures: shared.failures.snapshot(),
        fd_limit,
        elapsed_s: seconds(start.elapsed()),
    })
}

/// Connect (and, native, `connect`/`subscribe`), then close and wait for the server's close.
async fn cycle(index: u64, endpoint: Arc<Endpoint>, shared: Arc<Shared>) {
    let started = Instant::now();
    match endpoint.open(index).await {
        Ok(ws) => {
            shared.latencies.record(index, started.elapsed());
            if close(ws, endpoint.timeout).await {
                shared.succeeded.fetch_add(1, Relaxed);
            } else {
                shared.failed.fetch_add(1, Relaxed);
                shared
                    .failures
                    .add("close: no clean close from the server".into());
            }
        }
        Err(error) => {
            if error.is_fd_limit() {
                shared.fd_limit_hit.store(true, Relaxed);
            }
            shared.failed.fetch_add(1, Relaxed);
            shared.failures.add(error.reason());
        }
    }
    shared.in_flight.fetch_sub(1, Relaxed);
}

impl fmt::Display for ChurnReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "churn {} ({}) at {}", self.url, self.protocol, self.rate)?;
        writeln!(
            f,
            "  cycles {} in {:.1}s: {} succeeded, {} failed",
            self.attempted, self.duration_s, self.succeeded, self.failed
        )?;
        writeln!(f, "  connect latency: {}", self.connect_latency_us)?;
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
