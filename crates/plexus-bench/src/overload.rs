//! `overload`: a publisher faster than its subscribers can read. Slow subscribers read at most
//! `read_rate` messages a second (from a small socket receive buffer, so their backlog reaches
//! the server quickly) while one publisher publishes at `rate`; optional fast subscribers read
//! everything. Every `probe_every`, probes check that the server still serves others: a new
//! WebSocket connection with one round trip, HTTP `GET`s (`/health`, `/metrics`) and API calls
//! (`/api/info`), each timed; the server's RSS is sampled at the same time.
//!
//! After the publishing phase, slow subscribers read as fast as they can for up to `drain`, so
//! that a subscriber the server cut reaches the close frame behind its backlog: the report says
//! how each subscriber ended (closed with 3008 by the server, closed otherwise, still open).

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use crate::client::{close, interpret, preflight, Endpoint, Failures, OpenError, Received};
use crate::http::one_request;
use crate::latency::{Latencies, LatencySummary};
use crate::progress::{Progress, ProgressMode};
use crate::publisher::{PublishVia, Publisher};
use crate::rate::Rate;
use crate::seq::{stamp_message, SeqCounts, SeqTracker, PROBE};
use crate::system::{fd_soft_limit, rss_kib};
use crate::target::Target;
use crate::{check_count, check_duration, seconds, write_failures, BenchError, FdLimitReached};

/// `SO_RCVBUF` of slow subscribers: small, so that the server's queue, not the kernel's, holds
/// their backlog after a few seconds.
pub const SLOW_RECV_BUFFER: u32 = 16 * 1024;

/// The close code of a connection the server cut for being too slow.
pub const CLOSE_SLOW: u16 = 3008;

/// What a probe checks.
#[derive(Debug, Clone)]
pub enum Probe {
    /// A new WebSocket connection, one message sent and one received (an echo, or a room that
    /// sends a member its own messages), then a close.
    WebSocket(Endpoint),
    /// `GET` on a new connection; 200 is a success.
    Get(Target),
    /// `POST {}` to an API method with the key, on a new connection; 200 is a success.
    Api { target: Target, api_key: String },
}

impl Probe {
    fn url(&self) -> &str {
        match self {
            Probe::WebSocket(endpoint) => &endpoint.target.url,
            Probe::Get(target) | Probe::Api { target, .. } => &target.url,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Probe::WebSocket(_) => "websocket",
            Probe::Get(_) => "get",
            Probe::Api { .. } => "api",
        }
    }
}

#[derive(Debug, Clone)]
pub struct OverloadOptions {
    /// The subscribers' endpoint (for the native protocol, with the channel to subscribe to).
    pub endpoint: Endpoint,
    pub channel: String,
    pub publish: PublishVia,
    pub slow_subscribers: u64,
    pub fast_subscribers: u64,
    /// The publisher's rate.
    pub rate: Rate,
    /// The most messages a second each slow subscriber reads.
    pub read_rate: Rate,
    pub duration: Duration,
    pub size: usize,
    pub ramp: Rate,
    pub probes: Vec<Probe>,
    pub probe_every: Duration,
    /// Each probe's limit; a probe that takes longer fails.
    pub probe_timeout: Duration,
    /// How long slow subscribers may read at full speed after the publishing phase.
    pub drain: Duration,
    pub server_pid: Option<u32>,
    pub progress: ProgressMode,
}

impl OverloadOptions {
    pub fn default_time_limit(&self) -> Duration {
        self.ramp
            .span_of(self.slow_subscribers + self.fast_subscribers)
            + self.duration * 2
            + self.drain
            + Duration::from_secs(60)
    }
}

/// How one group of subscribers fared.
#[derive(Debug, Clone, Default, Serialize)]
pub struct GroupReport {
    pub requested: u64,
    pub connected: u64,
    /// Connected and received a probe before the publishing began.
    pub ready: u64,
    pub failed: u64,
    /// Closed by the server with 3008 (too slow).
    pub closed_slow: u64,
    /// Ended otherwise before the end of the run (reason → count in `failures`).
    pub closed_other: u64,
    /// Still open at the end.
    pub open_at_end: u64,
    pub deliveries: u64,
    /// Sent but not received, summed over the group (for subscribers cut as slow, it includes
    /// what the server dropped when it cut them).
    pub lost: u64,
    pub out_of_order: u64,
    pub latency_us: LatencySummary,
}

/// One probe's results over the run.
#[derive(Debug, Clone, Serialize)]
pub struct ProbeReport {
    pub url: String,
    /// `websocket`, `get` or `api`.
    pub kind: &'static str,
    pub attempts: u64,
    pub ok: u64,
    pub failures: BTreeMap<String, u64>,
    pub latency_us: LatencySummary,
}

/// The server's RSS: before the publishing, its highest sample, and at the end.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct RssSamples {
    pub before: u64,
    pub max: u64,
    pub end: u64,
    pub samples: u64,
}

impl RssSamples {
    fn observe(&mut self, kib: u64) {
        self.max = self.max.max(kib);
        self.end = kib;
        self.samples += 1;
    }
}

/// What `overload` measured; see the crate docs for the JSON form.
#[derive(Debug, Clone, Serialize)]
pub struct OverloadReport {
    pub bench: &'static str,
    pub url: String,
    pub protocol: &'static str,
    pub channel: String,
    pub rate: String,
    pub read_rate: String,
    pub size: usize,
    pub duration_s: f64,
    pub planned: u64,
    pub sent: u64,
    pub publish_errors: u64,
    pub slow: GroupReport,
    pub fast: GroupReport,
    pub probes: Vec<ProbeReport>,
    pub server_rss_kib: Option<RssSamples>,
    pub failures: BTreeMap<String, u64>,
    pub fd_limit: Option<FdLimitReached>,
    pub elapsed_s: f64,
}

/// Paces a reader to at most one read every `interval`, with no credit for time it spent
/// waiting for messages (a reader that got nothing for a while does not then read a burst).
#[derive(Debug, Clone, Copy)]
pub struct Pacer {
    interval: Duration,
    last: Option<Instant>,
}

impl Pacer {
    pub fn new(rate: Rate) -> Pacer {
        Pacer {
            interval: rate.due(1).max(Duration::from_nanos(1)),
            last: None,
        }
    }

    /// The reader wants to read at `now`: when it may (now, or one interval after the last read).
    pub fn next_read(&mut self, now: Instant) -> Instant {
        let at = match self.last {
            Some(last) => now.max(last + self.interval),
            None => now,
        };
        self.last = Some(at);
        at
    }
}

/// How a subscriber's connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    /// Still open when the run ended.
    Open,
    /// The server closed with 3008.
    Slow,
    /// Anything else: the reason.
    Other(String),
}

impl Ending {
    pub fn of(error: &OpenError) -> Ending {
        match error {
            OpenError::Closed(CLOSE_SLOW, _) => Ending::Slow,
            other => Ending::Other(other.reason()),
        }
    }
}

/// A group's counters.
struct Group {
    requested: u64,
    connected: AtomicU64,
    ready: AtomicU64,
    failed: AtomicU64,
    closed_slow: AtomicU64,
    closed_other: AtomicU64,
    deliveries: AtomicU64,
    latencies: Latencies,
}

impl Group {
    fn new(requested: u64) -> Group {
        Group {
            requested,
            connected: AtomicU64::new(0),
            ready: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            closed_slow: AtomicU64::new(0),
            closed_other: AtomicU64::new(0),
            deliveries: AtomicU64::new(0),
            latencies: Latencies::new(),
        }
    }

    fn alive(&self) -> u64 {
        self.connected
            .load(Relaxed)
            .saturating_sub(self.closed_slow.load(Relaxed) + self.closed_other.load(Relaxed))
    }

    fn report(&self, counts: SeqCounts) -> GroupReport {
        GroupReport {
            requested: self.requested,
            connected: self.connected.load(Relaxed),
            ready: self.ready.load(Relaxed),
            failed: self.failed.load(Relaxed),
            closed_slow: self.closed_slow.load(Relaxed),
            closed_other: self.closed_other.load(Relaxed),
            open_at_end: self.alive(),
            deliveries: counts.received,
            lost: counts.lost,
            out_of_order: counts.out_of_order,
            latency_us: self.latencies.summary(),
        }
    }
}

struct Shared {
    epoch: Instant,
    slow: Group,
    fast: Group,
    sent: AtomicU64,
    publish_errors: AtomicU64,
    fd_limit_hit: AtomicBool,
    failures: Failures,
    /// Set after the publishing phase: slow subscribers stop pacing.
    draining: CancellationToken,
}

impl Shared {
    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn group(&self, slow: bool) -> &Group {
        if slow {
            &self.slow
        } else {
            &self.fast
        }
    }

    fn connected(&self) -> u64 {
        self.slow.connected.load(Relaxed) + self.fast.connected.load(Relaxed)
    }

    fn settled(&self, attempted: u64) -> bool {
        self.connected() + self.slow.failed.load(Relaxed) + self.fast.failed.load(Relaxed)
            >= attempted
    }

    fn all_ready(&self) -> bool {
        self.slow.ready.load(Relaxed) + self.fast.ready.load(Relaxed)
            >= self.slow.alive() + self.fast.alive()
    }
}

/// One probe's running tally.
struct ProbeTally {
    attempts: AtomicU64,
    ok: AtomicU64,
    failures: Failures,
    latencies: Latencies,
}

pub async fn overload(options: OverloadOptions) -> Result<OverloadReport, BenchError> {
    check_count(
        "--subscribers",
        options.slow_subscribers,
        crate::MAX_CONNECTIONS,
    )?;
    if options.fast_subscribers > crate::MAX_CONNECTIONS {
        return Err(BenchError::Usage(format!(
            "--fast-subscribers must be at most {}",
            crate::MAX_CONNECTIONS
        )));
    }
    check_duration("--duration", options.duration)?;
    check_duration("--drain", options.drain)?;
    check_duration("--probe-every", options.probe_every)?;
    if options.size > crate::MAX_SIZE {
        return Err(BenchError::Usage(format!(
            "--size must be at most {}",
            crate::MAX_SIZE
        )));
    }
    preflight(&options.endpoint).await?;
    let mut publisher =
        Publisher::open(&options.endpoint, &options.channel, &options.publish).await?;
    let shared = Arc::new(Shared {
        epoch: Instant::now(),
        slow: Group::new(options.slow_subscribers),
        fast: Group::new(options.fast_subscribers),
        sent: AtomicU64::new(0),
        publish_errors: AtomicU64::new(0),
        fd_limit_hit: AtomicBool::new(false),
        failures: Failures::default(),
        draining: CancellationToken::new(),
    });
    {
        let shared = shared.clone();
        publisher.start_reader(move |reason| {
            shared.publish_errors.fetch_add(1, Relaxed);
            shared.failures.add(reason);
        });
    }
    let start = shared.epoch;
    let planned = options.rate.events_in(options.duration);
    let phase = Arc::new(Mutex::new("subscribing"));
    let progress = {
        let shared = shared.clone();
        let phase = phase.clone();
        Progress::start(options.progress, move || {
            format!(
                "overload: slow {} open ({} cut 3008), fast {} open, sent {}/{planned}, {}, {:.1}s",
                shared.slow.alive(),
                shared.slow.closed_slow.load(Relaxed),
                shared.fast.alive(),
                shared.sent.load(Relaxed),
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

    // Subscribers: the fast ones first, then the slow ones with a small receive buffer.
    let fast_endpoint = Arc::new(options.endpoint.clone());
    let slow_endpoint = Arc::new(Endpoint {
        recv_buffer: Some(SLOW_RECV_BUFFER),
        ..options.endpoint.clone()
    });
    let cancel = CancellationToken::new();
    let mut tasks = JoinSet::new();
    let total = options.fast_subscribers + options.slow_subscribers;
    let mut attempted = 0;
    for index in 0..total {
        tokio::time::sleep_until((start + options.ramp.due(index)).into()).await;
        if shared.fd_limit_hit.load(Relaxed) {
            break;
        }
        attempted += 1;
        let slow = index >= options.fast_subscribers;
        let endpoint = if slow {
            slow_endpoint.clone()
        } else {
            fast_endpoint.clone()
        };
        let pacer = slow.then(|| Pacer::new(options.read_rate));
        tasks.spawn(subscriber(
            index,
            endpoint,
            pacer,
            shared.clone(),
            cancel.clone(),
        ));
    }
    while !shared.settled(attempted) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let fd_limit = shared.fd_limit_hit.load(Relaxed).then(|| {
        let reached = FdLimitReached {
            limit: fd_soft_limit(),
            opened: shared.connected(),
        };
        eprintln!("plexus bench: {reached}");
        reached
    });

    // Probes until every subscriber has one: then each is subscribed.
    set_phase("warming up");
    let warm_until = Instant::now() + Duration::from_secs(15);
    while !shared.all_ready() && Instant::now() < warm_until {
        let probe = stamp_message(PROBE, shared.now(), options.size);
        if let Err(error) = publisher.publish(probe).await {
            return Err(BenchError::Connect {
                target: publisher.describe(),
                reason: format!("publishing failed: {error}"),
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Probes and RSS samples, from now until the end of the drain.
    let rss_before = options.server_pid.map(rss_kib).transpose()?;
    let rss = Arc::new(Mutex::new(rss_before.map(|before| RssSamples {
        before,
        max: before,
        end: before,
        samples: 1,
    })));
    let tallies: Arc<Vec<ProbeTally>> = Arc::new(
        options
            .probes
            .iter()
            .map(|_| ProbeTally {
                attempts: AtomicU64::new(0),
                ok: AtomicU64::new(0),
                failures: Failures::default(),
                latencies: Latencies::new(),
            })
            .collect(),
    );
    let probing = CancellationToken::new();
    let prober = tokio::spawn(probe_loop(
        options.clone(),
        tallies.clone(),
        rss.clone(),
        probing.clone(),
    ));

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
        match publisher
            .publish_numbered(
                next + 1,
                shared.now(),
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

    // Slow subscribers now read as fast as they can, until each has ended and the fast ones
    // have everything, or nothing arrives for a second (or the drain time is up).
    set_phase("draining");
    shared.draining.cancel();
    let drain_until = Instant::now() + options.drain;
    let mut last = (total_deliveries(&shared), Instant::now());
    let waiting = || {
        shared.slow.alive() > 0 || shared.fast.deliveries.load(Relaxed) < shared.fast.alive() * sent
    };
    while waiting() && Instant::now() < drain_until {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = total_deliveries(&shared);
        if now != last.0 {
            last = (now, Instant::now());
        } else if last.1.elapsed() >= Duration::from_secs(1) {
            break;
        }
    }
    probing.cancel();
    let _ = prober.await;
    let rejected_late = if publisher.errors_come_late() {
        shared.publish_errors.load(Relaxed)
    } else {
        0
    };
    let published = sent.saturating_sub(rejected_late);
    cancel.cancel();
    let (mut slow_counts, mut fast_counts) = (SeqCounts::default(), SeqCounts::default());
    while let Some(result) = tasks.join_next().await {
        if let Ok(Some((slow, tracker))) = result {
            if slow {
                slow_counts += tracker.finish(published);
            } else {
                fast_counts += tracker.finish(published);
            }
        }
    }
    publisher.close().await;
    set_phase("done");
    progress.finish().await;

    let probes = options
        .probes
        .iter()
        .zip(tallies.iter())
        .map(|(probe, tally)| ProbeReport {
            url: probe.url().to_owned(),
            kind: probe.kind(),
            attempts: tally.attempts.load(Relaxed),
            ok: tally.ok.load(Relaxed),
            failures: tally.failures.snapshot(),
            latency_us: tally.latencies.summary(),
        })
        .collect();
    let server_rss_kib = *rss.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    Ok(OverloadReport {
        bench: "overload",
        url: options.endpoint.target.url.clone(),
        protocol: options.endpoint.protocol.name(),
        channel: options.channel.clone(),
        rate: options.rate.to_string(),
        read_rate: options.read_rate.to_string(),
        size: options.size,
        duration_s: seconds(options.duration),
        planned,
        sent: published,
        publish_errors: shared.publish_errors.load(Relaxed),
        slow: shared.slow.report(slow_counts),
        fast: shared.fast.report(fast_counts),
        probes,
        server_rss_kib,
        failures: shared.failures.snapshot(),
        fd_limit,
        elapsed_s: seconds(start.elapsed()),
    })
}

fn total_deliveries(shared: &Shared) -> u64 {
    shared.slow.deliveries.load(Relaxed) + shared.fast.deliveries.load(Relaxed)
}

/// Every `probe_every`: each probe in its own task (a stuck one does not delay the others or
/// the next round), and an RSS sample.
async fn probe_loop(
    options: OverloadOptions,
    tallies: Arc<Vec<ProbeTally>>,
    rss: Arc<Mutex<Option<RssSamples>>>,
    stop: CancellationToken,
) {
    let mut resolved: Vec<Option<SocketAddr>> = Vec::new();
    for probe in &options.probes {
        resolved.push(match probe {
            Probe::WebSocket(_) => None,
            Probe::Get(target) | Probe::Api { target, .. } => target.resolve().await.ok(),
        });
    }
    let mut ticks = tokio::time::interval(options.probe_every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut running = JoinSet::new();
    let mut round: u64 = 0;
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = ticks.tick() => {}
        }
        round += 1;
        if let Some(pid) = options.server_pid {
            if let Ok(kib) = rss_kib(pid) {
                if let Some(samples) = rss
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .as_mut()
                {
                    samples.observe(kib);
                }
            }
        }
        for (index, probe) in options.probes.iter().enumerate() {
            let probe = probe.clone();
            let addr = resolved[index];
            let tallies = tallies.clone();
            let limit = options.probe_timeout;
            running.spawn(async move {
                let tally = &tallies[index];
                tally.attempts.fetch_add(1, Relaxed);
                let started = Instant::now();
                let outcome = tokio::time::timeout(limit, run_probe(&probe, addr, round))
                    .await
                    .unwrap_or_else(|_| Err(format!("no answer within {limit:?}")));
                match outcome {
                    Ok(()) => {
                        tally.latencies.record(round, started.elapsed());
                        tally.ok.fetch_add(1, Relaxed);
                    }
                    Err(reason) => tally.failures.add(reason),
                }
            });
        }
        while running.try_join_next().is_some() {}
    }
    // The probes under way finish (each within its limit).
    while running.join_next().await.is_some() {}
    if let (Some(pid), Some(samples)) = (
        options.server_pid,
        rss.lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .as_mut(),
    ) {
        if let Ok(kib) = rss_kib(pid) {
            samples.observe(kib);
        }
    }
}

async fn run_probe(probe: &Probe, addr: Option<SocketAddr>, round: u64) -> Result<(), String> {
    match probe {
        Probe::WebSocket(endpoint) => {
            let mut ws = endpoint.open(round).await.map_err(|error| error.reason())?;
            let sent = stamp_message(PROBE, round, 0);
            ws.send(Message::text(sent))
                .await
                .map_err(|error| OpenError::from_ws(error).reason())?;
            loop {
                match ws.next().await {
                    Some(Ok(Message::Text(_))) => break,
                    Some(Ok(Message::Close(_))) | None => return Err("closed".into()),
                    Some(Ok(_)) => {}
                    Some(Err(error)) => return Err(OpenError::from_ws(error).reason()),
                }
            }
            close(ws, Duration::from_secs(1)).await;
            Ok(())
        }
        Probe::Get(target) | Probe::Api { target, .. } => {
            let addr = addr.ok_or_else(|| format!("cannot resolve {}", target.authority))?;
            let api_key = match probe {
                Probe::Api { api_key, .. } => Some(api_key.as_str()),
                _ => None,
            };
            match one_request(addr, target, api_key).await? {
                200 => Ok(()),
                status => Err(format!("HTTP {status}")),
            }
        }
    }
}

/// One subscriber; `pacer` makes it slow. Returns whether it was slow and what it saw, or
/// `None` if it never connected.
async fn subscriber(
    index: u64,
    endpoint: Arc<Endpoint>,
    mut pacer: Option<Pacer>,
    shared: Arc<Shared>,
    cancel: CancellationToken,
) -> Option<(bool, SeqTracker)> {
    let slow = pacer.is_some();
    let group = shared.group(slow);
    let mut ws = match endpoint.open(index).await {
        Ok(ws) => ws,
        Err(error) => {
            if error.is_fd_limit() {
                shared.fd_limit_hit.store(true, Relaxed);
            }
            shared.failures.add(error.reason());
            group.failed.fetch_add(1, Relaxed);
            return None;
        }
    };
    group.connected.fetch_add(1, Relaxed);
    let mut tracker = SeqTracker::new();
    let mut ready = false;
    let ending = 'read: loop {
        // A slow reader waits before each read, until the drain.
        if let Some(pacer) = &mut pacer {
            let now = Instant::now();
            let at = pacer.next_read(now);
            if at > now && !shared.draining.is_cancelled() {
                tokio::select! {
                    () = cancel.cancelled() => break 'read Ending::Open,
                    () = shared.draining.cancelled() => {}
                    () = tokio::time::sleep_until(at.into()) => {}
                }
            }
        }
        let message = tokio::select! {
            () = cancel.cancelled() => break 'read Ending::Open,
            message = ws.next() => message,
        };
        let message = match message {
            Some(Ok(message)) => message,
            Some(Err(error)) => break Ending::of(&OpenError::from_ws(error)),
            None => break Ending::Other("connection closed".into()),
        };
        match interpret(&endpoint.protocol, &message) {
            Received::Stamps { stamps, ping } => {
                if ping {
                    if let Err(error) = ws.send(Message::text("{}")).await {
                        break Ending::of(&OpenError::from_ws(error));
                    }
                }
                let now = shared.now();
                if !ready {
                    ready = true;
                    group.ready.fetch_add(1, Relaxed);
                }
                for stamp in stamps.into_iter().filter(|stamp| stamp.seq != PROBE) {
                    group
                        .latencies
                        .record(index, Duration::from_nanos(now.saturating_sub(stamp.t)));
                    tracker.observe(stamp.seq);
                    group.deliveries.fetch_add(1, Relaxed);
                }
            }
            Received::Ping => {
                if let Err(error) = ws.send(Message::text("{}")).await {
                    break Ending::of(&OpenError::from_ws(error));
                }
            }
            Received::Closed(code, reason) => break Ending::of(&OpenError::Closed(code, reason)),
            Received::Other => {}
        }
    };
    match ending {
        Ending::Open => {
            close(ws, Duration::from_secs(2)).await;
        }
        Ending::Slow => {
            group.closed_slow.fetch_add(1, Relaxed);
        }
        Ending::Other(reason) => {
            group.closed_other.fetch_add(1, Relaxed);
            let who = if slow { "slow" } else { "fast" };
            shared.failures.add(format!("{who} subscriber: {reason}"));
        }
    }
    Some((slow, tracker))
}

fn write_group(f: &mut fmt::Formatter<'_>, name: &str, group: &GroupReport) -> fmt::Result {
    writeln!(
        f,
        "  {name} subscribers {}/{} connected ({} failed): {} cut with 3008, {} ended otherwise, {} open at the end",
        group.connected,
        group.requested,
        group.failed,
        group.closed_slow,
        group.closed_other,
        group.open_at_end
    )?;
    writeln!(
        f,
        "    deliveries {}, lost {}, out of order {}; latency: {}",
        group.deliveries, group.lost, group.out_of_order, group.latency_us
    )
}

impl fmt::Display for OverloadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "overload {} ({}, channel {}): published {}/{} at {} ({} bytes, {} errors); slow readers take {}",
            self.url,
            self.protocol,
            self.channel,
            self.sent,
            self.planned,
            self.rate,
            self.size,
            self.publish_errors,
            self.read_rate
        )?;
        write_group(f, "slow", &self.slow)?;
        if self.fast.requested > 0 {
            write_group(f, "fast", &self.fast)?;
        }
        for probe in &self.probes {
            writeln!(
                f,
                "  probe {} {}: {}/{} ok; {}",
                probe.kind, probe.url, probe.ok, probe.attempts, probe.latency_us
            )?;
            write_failures(f, &probe.failures)?;
        }
        if let Some(rss) = &self.server_rss_kib {
            writeln!(
                f,
                "  server RSS: {} KiB before, {} KiB at most, {} KiB at the end",
                rss.before, rss.max, rss.end
            )?;
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slow_reader_gets_no_credit_for_waiting() {
        let mut pacer = Pacer::new(Rate::per_second(10));
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let reads: Vec<_> = [0, 10, 150, 1300, 1300]
            .map(|at| pacer.next_read(t0 + ms(at)) - t0)
            .into();
        // The first read at once; then one every 100 ms at most; after a second with nothing
        // to read, one read, and the next one 100 ms later again, not a burst to catch up.
        assert_eq!(reads, [0, 100, 200, 1300, 1400].map(ms));
    }

    #[test]
    fn endings() {
        assert_eq!(
            Ending::of(&OpenError::Closed(3008, "slow".into())),
            Ending::Slow
        );
        assert_eq!(
            Ending::of(&OpenError::Closed(1001, "server shutting down".into())),
            Ending::Other("closed 1001 server shutting down".into())
        );
        assert_eq!(
            Ending::of(&OpenError::Ws("connection closed".into())),
            Ending::Other("connection closed".into())
        );
    }

    #[test]
    fn rss_samples_keep_the_highest_and_the_last() {
        let mut samples = RssSamples {
            before: 100,
            max: 100,
            end: 100,
            samples: 1,
        };
        for kib in [150, 400, 120] {
            samples.observe(kib);
        }
        assert_eq!(
            samples,
            RssSamples {
                before: 100,
                max: 400,
                end: 120,
                samples: 4
            }
        );
    }
}
