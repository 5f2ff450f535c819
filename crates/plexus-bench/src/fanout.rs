//! `fanout`: N subscribers on one channel, one publisher at a fixed rate; order, loss and
//! latency at every subscriber. The subscribers are read by one thread ([`reader`]), so that the
//! generator's own cost per delivery stays well under the server's.

mod reader;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::task::JoinSet;

use self::reader::Readers;
use crate::client::{preflight, Endpoint, Failures};
use crate::latency::{Latencies, LatencySummary};
use crate::progress::{Progress, ProgressMode};
use crate::publisher::{PublishVia, Publisher};
use crate::rate::Rate;
use crate::seq::{stamp_message, SeqCounts, PROBE};
use crate::system::fd_soft_limit;
use crate::{
    check_count, check_duration, per_second, seconds, write_failures, BenchError, FdLimitReached,
};

#[derive(Debug, Clone)]
pub struct FanoutOptions {
    /// The subscribers' endpoint (for the native protocol, with the channel to subscribe to).
    pub endpoint: Endpoint,
    /// The channel publications go to: `chat:{room}` for `/chat/{room}`.
    pub channel: String,
    pub subscribers: u64,
    pub rate: Rate,
    pub duration: Duration,
    pub size: usize,
    pub publish: PublishVia,
    /// How fast subscribers connect.
    pub ramp: Rate,
    pub progress: ProgressMode,
}

impl FanoutOptions {
    /// Subscribing at the ramp rate, twice the duration (a slow publisher), and a minute.
    pub fn default_time_limit(&self) -> Duration {
        self.ramp.span_of(self.subscribers) + self.duration * 2 + Duration::from_secs(60)
    }
}

/// What `fanout` measured; see the crate docs for the JSON form.
#[derive(Debug, Clone, Serialize)]
pub struct FanoutReport {
    pub bench: &'static str,
    pub url: String,
    pub protocol: &'static str,
    pub publisher: &'static str,
    pub channel: String,
    pub subscribers: u64,
    pub connected: u64,
    pub ready: u64,
    pub failed: u64,
    pub dropped: u64,
    pub rate: String,
    pub size: usize,
    pub duration_s: f64,
    pub planned: u64,
    pub sent: u64,
    pub publish_errors: u64,
    pub deliveries: u64,
    pub expected_deliveries: u64,
    pub deliveries_per_s: f64,
    pub lost: u64,
    pub out_of_order: u64,
    pub latency_us: LatencySummary,
    pub failures: BTreeMap<String, u64>,
    pub fd_limit: Option<FdLimitReached>,
    pub elapsed_s: f64,
}

struct Shared {
    /// The shared start instant: stamps are nanoseconds since it.
    epoch: Instant,
    attempted: AtomicU64,
    connected: AtomicU64,
    failed: AtomicU64,
    ready: AtomicU64,
    dropped: AtomicU64,
    deliveries: AtomicU64,
    sent: AtomicU64,
    /// Nanoseconds since `epoch` of the first measured send and the last measured delivery.
    first_send: AtomicU64,
    last_delivery: AtomicU64,
    /// Native `publish` commands the server answered with an error.
    publish_errors: AtomicU64,
    fd_limit_hit: AtomicBool,
    failures: Failures,
    latencies: Latencies,
}

impl Shared {
    fn new() -> Shared {
        Shared {
            epoch: Instant::now(),
            attempted: AtomicU64::new(0),
            connected: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            ready: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            deliveries: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            first_send: AtomicU64::new(0),
            last_delivery: AtomicU64::new(0),
            publish_errors: AtomicU64::new(0),
            fd_limit_hit: AtomicBool::new(false),
            failures: Failures::default(),
            latencies: Latencies::new(),
        }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn alive(&self) -> u64 {
        let dropped = self.dropped.load(Relaxed);
        self.connected.load(Relaxed).saturating_sub(dropped)
    }
}

/// Runs the fan-out load and reports.
pub async fn fanout(options: FanoutOptions) -> Result<FanoutReport, BenchError> {
    check_count("--subscribers", options.subscribers, crate::MAX_CONNECTIONS)?;
    check_duration("--duration", options.duration)?;
    if options.size > crate::MAX_SIZE {
        return Err(BenchError::Usage(format!(
            "--size must be at most {}",
            crate::MAX_SIZE
        )));
    }
    preflight(&options.endpoint).await?;
    let mut publisher =
        Publisher::open(&options.endpoint, &options.channel, &options.publish).await?;

    let shared = Arc::new(Shared::new());
    {
        let shared = shared.clone();
        publisher.start_reader(move |reason| {
            shared.publish_errors.fetch_add(1, Relaxed);
            shared.failures.add(reason);
        });
    }
    let start = shared.epoch;
    let planned = options.rate.events_in(options.duration);
    let phase = Arc::new(std::sync::Mutex::new("subscribing"));
    let progress = {
        let shared = shared.clone();
        let phase = phase.clone();
        let subscribers = options.subscribers;
        Progress::start(options.progress, move || {
            format!(
                "fanout: {}/{subscribers} subscribed ({} ready, {} failed), sent {}/{planned}, {} deliveries, {}, {:.1}s",
                shared.alive(),
                shared.ready.load(Relaxed),
                shared.failed.load(Relaxed),
                shared.sent.load(Relaxed),
                shared.deliveries.load(Relaxed),
                phase.lock().map_or("", |phase| *phase),
                start.elapsed().as_secs_f64()
            )
        })
    };
    let set_phase = |name: &'static str| {
        if let Ok(mut phase) = phase.lock() {
            *phase = name;
        }
    };

    // Subscribe, at the ramp rate: tasks open the subscribers and hand them to the reader.
    let readers =
        Arc::new(
            Readers::start(shared.clone()).map_err(|error| BenchError::Connect {
                target: options.endpoint.target.url.clone(),
                reason: format!("cannot start the reader thread: {error}"),
            })?,
        );
    let endpoint = Arc::new(options.endpoint.clone());
    let mut tasks = JoinSet::new();
    for index in 0..options.subscribers {
        tokio::time::sleep_until((start + options.ramp.due(index)).into()).await;
        if shared.fd_limit_hit.load(Relaxed) {
            break;
        }
        shared.attempted.fetch_add(1, Relaxed);
        tasks.spawn(subscriber(
            index,
            endpoint.clone(),
            shared.clone(),
            readers.clone(),
        ));
    }
    while shared.connected.load(Relaxed) + shared.failed.load(Relaxed)
        < shared.attempted.load(Relaxed)
    {
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

    // Probes until every subscriber has one: then each is subscribed.
    set_phase("warming up");
    let warm_until = Instant::now() + Duration::from_secs(15);
    while shared.ready.load(Relaxed) < shared.alive() && Instant::now() < warm_until {
        let probe = stamp_message(PROBE, shared.now(), options.size);
        if let Err(error) = publisher.publish(probe).await {
            return Err(BenchError::Connect {
                target: publisher.describe(),
                reason: format!("publishing failed: {error}"),
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The measured phase, paced.
    set_phase("publishing");
    let publish_start = Instant::now();
    let give_up = publish_start + options.duration * 2 + Duration::from_secs(5);
    let mut next = 0;
    while next < planned {
        tokio::time::sleep_until((publish_start + options.rate.due(next)).into()).await;
        if Instant::now() > give_up {
            shared
                .failures
                .add("publisher: could not keep up; stopped".into());
            break;
        }
        let t = shared.now();
        if next == 0 {
            shared.first_send.store(t, Relaxed);
        }
        match publisher
            .publish_numbered(
                next + 1,
                t,
                options.size,
                &shared.publish_errors,
                &shared.failures,
            )
            .await
        {
            Ok(true) => {
                next += 1;
                shared.sent.store(next, Relaxed);
            }
            Ok(false) => {}
            Err(()) => break,
        }
    }
    let sent = next;

    // Wait for the deliveries still on their way.
    set_phase("draining");
    let drain_until = Instant::now() + Duration::from_secs(5);
    while shared.deliveries.load(Relaxed) < shared.alive() * sent && Instant::now() < drain_until {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Native publish errors arrive after the send: those numbers were never published.
    let rejected_late = if publisher.errors_come_late() {
        shared.publish_errors.load(Relaxed)
    } else {
        0
    };
    let published = sent.saturating_sub(rejected_late);
    while tasks.join_next().await.is_some() {}
    let mut counts = SeqCounts::default();
    if let Ok(readers) = Arc::try_unwrap(readers) {
        for tracker in readers.finish().await {
            counts += tracker.finish(published);
        }
    }
    publisher.close().await;
    set_phase("done");
    progress.finish().await;

    let first = shared.first_send.load(Relaxed);
    let last = shared.last_delivery.load(Relaxed);
    let span = Duration::from_nanos(last.saturating_sub(first));
    let ready = shared.ready.load(Relaxed);
    Ok(FanoutReport {
        bench: "fanout",
        url: options.endpoint.target.url.clone(),
        protocol: options.endpoint.protocol.name(),
        publisher: match (&options.publish, &options.endpoint.protocol) {
            (PublishVia::Api { .. }, _) => "api",
            (PublishVia::Endpoint, protocol) => protocol.name(),
        },
        channel: options.channel.clone(),
        subscribers: options.subscribers,
        connected: shared.connected.load(Relaxed),
        ready,
        failed: shared.failed.load(Relaxed),
        dropped: shared.dropped.load(Relaxed),
        rate: options.rate.to_string(),
        size: options.size,
        duration_s: seconds(options.duration),
        planned,
        sent: published,
        publish_errors: shared.publish_errors.load(Relaxed),
        deliveries: counts.received,
        expected_deliveries: ready * published,
        deliveries_per_s: per_second(counts.received, span),
        lost: counts.lost,
        out_of_order: counts.out_of_order,
        latency_us: shared.latencies.summary(),
        failures: shared.failures.snapshot(),
        fd_limit,
        elapsed_s: seconds(start.elapsed()),
    })
}

/// Opens one subscriber and hands it to the reader thread.
async fn subscriber(
    index: u64,
    endpoint: Arc<Endpoint>,
    shared: Arc<Shared>,
    readers: Arc<Readers>,
) {
    match reader::open(&endpoint, index, &shared).await {
        Ok(opened) => {
            shared.connected.fetch_add(1, Relaxed);
            if let Err(reason) = readers.add(opened) {
                shared.dropped.fetch_add(1, Relaxed);
                shared.failures.add(format!("dropped: {reason}"));
            }
        }
        Err(error) => {
            if error.is_fd_limit() {
                shared.fd_limit_hit.store(true, Relaxed);
            }
            shared.failures.add(error.reason());
            shared.failed.fetch_add(1, Relaxed);
        }
    }
}

impl fmt::Display for FanoutReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "fanout {} ({}, channel {}, published via {})",
            self.url, self.protocol, self.channel, self.publisher
        )?;
        writeln!(
            f,
            "  subscribers {}/{} connected ({} ready, {} failed, {} dropped)",
            self.connected, self.subscribers, self.ready, self.failed, self.dropped
        )?;
        writeln!(
            f,
            "  published {}/{} messages of {} bytes at {} ({} publish errors)",
            self.sent, self.planned, self.size, self.rate, self.publish_errors
        )?;
        writeln!(
            f,
            "  deliveries {}/{} ({:.1}/s), lost {}, out of order {}",
            self.deliveries,
            self.expected_deliveries,
            self.deliveries_per_s,
            self.lost,
            self.out_of_order
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
