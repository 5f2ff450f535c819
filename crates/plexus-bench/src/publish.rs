//! `publish`: acknowledged publishes as fast as the server takes them, from N concurrent
//! publishers, each with one publish in flight: a native client that waits for each `publish`
//! reply, or a keep-alive HTTP connection to `POST /api/publish` that waits for each response.
//!
//! A publish counts once the server acknowledged it (for a channel with history on the durable
//! engine, that is once it is on disk), so publishes per second is the server's acknowledged
//! throughput at that concurrency, and the latency is the time from sending a publish to its
//! acknowledgement.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use plexus_protocol::client::parse_replies;
use serde::Serialize;
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use crate::client::{close, native_publish, preflight, Endpoint, Failures, OpenError, Ws};
use crate::http::ApiPublisher;
use crate::latency::{Latencies, LatencySummary};
use crate::progress::{Progress, ProgressMode};
use crate::seq::stamp_message;
use crate::system::fd_soft_limit;
use crate::target::Target;
use crate::{
    check_count, check_duration, per_second, seconds, write_failures, BenchError, FdLimitReached,
};

/// The most concurrent publishers of one run.
pub const MAX_PUBLISHERS: u64 = 10_000;

/// Where the publishes go.
#[derive(Debug, Clone)]
pub enum PublishPath {
    /// Native clients of `endpoint` (its protocol is native, with a token and no channel).
    Native { endpoint: Endpoint },
    /// `POST` to the API at `target` (e.g. `http://127.0.0.1:8000/api/publish`) with `api_key`.
    Api {
        target: Target,
        api_key: String,
        /// Limit for each request.
        timeout: Duration,
    },
}

impl PublishPath {
    fn name(&self) -> &'static str {
        match self {
            PublishPath::Native { .. } => "native",
            PublishPath::Api { .. } => "api",
        }
    }

    fn url(&self) -> &str {
        match self {
            PublishPath::Native { endpoint } => &endpoint.target.url,
            PublishPath::Api { target, .. } => &target.url,
        }
    }
}

#[derive(Debug, Clone)]
pub struct PublishOptions {
    pub path: PublishPath,
    /// The channel, or with `channels` > 1 the stem of `{channel}-0` … `{channel}-{channels-1}`.
    pub channel: String,
    /// Channels the publishers are spread over (publisher i uses channel i mod `channels`).
    pub channels: u64,
    pub publishers: u64,
    pub duration: Duration,
    pub size: usize,
    pub progress: ProgressMode,
    /// Let the runtime sleep while every publisher waits. Off by default: while publishing,
    /// a task keeps the runtime polling, because on loopback a write to a sleeping reader
    /// costs the *writer* (the server under test) the reader's wake-up, which a remote
    /// client never would; a server that answers more slowly leaves the generator asleep
    /// more often and would pay more of it (as `fanout`'s reader, see there).
    pub sleep_when_idle: bool,
}

impl PublishOptions {
    pub fn default_time_limit(&self) -> Duration {
        self.duration + Duration::from_secs(60)
    }
}

/// The channel publisher `index` publishes into.
pub fn channel_for(stem: &str, channels: u64, index: u64) -> String {
    if channels <= 1 {
        stem.to_owned()
    } else {
        format!("{stem}-{}", index % channels)
    }
}

/// What `publish` measured; see the crate docs for the JSON form.
#[derive(Debug, Clone, Serialize)]
pub struct PublishReport {
    pub bench: &'static str,
    pub url: String,
    /// `native` or `api`.
    pub via: &'static str,
    pub channel: String,
    pub channels: u64,
    pub publishers: u64,
    pub connected: u64,
    pub failed: u64,
    pub dropped: u64,
    pub size: usize,
    pub duration_s: f64,
    /// Publishes acknowledged within the duration.
    pub published: u64,
    /// Publishes answered with an error (or not answered) within the duration.
    pub errors: u64,
    pub publishes_per_s: f64,
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
    published: AtomicU64,
    errors: AtomicU64,
    fd_limit_hit: AtomicBool,
    failures: Failures,
    latencies: Latencies,
    /// Set when every publisher is connected: publishes count from then until this deadline.
    deadline: OnceLock<Instant>,
}

impl Shared {
    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn error(&self, reason: String) {
        self.errors.fetch_add(1, Relaxed);
        self.failures.add(reason);
    }
}

pub async fn publish(options: PublishOptions) -> Result<PublishReport, BenchError> {
    check_count("--publishers", options.publishers, MAX_PUBLISHERS)?;
    check_count("--channels", options.channels, MAX_PUBLISHERS)?;
    check_duration("--duration", options.duration)?;
    if options.size > crate::MAX_SIZE {
        return Err(BenchError::Usage(format!(
            "--size must be at most {}",
            crate::MAX_SIZE
        )));
    }
    let api_addr = match &options.path {
        PublishPath::Native { endpoint } => {
            preflight(endpoint).await?;
            None
        }
        PublishPath::Api {
            target,
            api_key,
            timeout,
        } => {
            let addr = target.resolve().await?;
            // One publish first: the API answers, and takes the key and the channel.
            let mut api = ApiPublisher::new(target.clone(), addr, api_key.clone(), *timeout);
            api.publish(&options.channel, &stamp_message(0, 0, options.size))
                .await
                .map_err(|reason| BenchError::Connect {
                    target: target.url.clone(),
                    reason,
                })?;
            Some(addr)
        }
    };
    let shared = Arc::new(Shared {
        epoch: Instant::now(),
        connected: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        dropped: AtomicU64::new(0),
        published: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        fd_limit_hit: AtomicBool::new(false),
        failures: Failures::default(),
        latencies: Latencies::new(),
        deadline: OnceLock::new(),
    });
    let start = shared.epoch;
    let go = CancellationToken::new();
    let progress = {
        let shared = shared.clone();
        let publishers = options.publishers;
        Progress::start(options.progress, move || {
            let phase = match shared.deadline.get() {
                None => "connecting",
                Some(deadline) if Instant::now() < *deadline => "publishing",
                Some(_) => "finishing",
            };
            format!(
                "publish: {}/{publishers} connected, {} failed, {} published, {} errors, {phase}, {:.1}s",
                shared.connected.load(Relaxed),
                shared.failed.load(Relaxed),
                shared.published.load(Relaxed),
                shared.errors.load(Relaxed),
                start.elapsed().as_secs_f64()
            )
        })
    };

    let options = Arc::new(options);
    let mut tasks = JoinSet::new();
    for index in 0..options.publishers {
        tasks.spawn(publisher(
            index,
            options.clone(),
            api_addr,
            shared.clone(),
            go.clone(),
        ));
    }
    while shared.connected.load(Relaxed) + shared.failed.load(Relaxed) < options.publishers {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let measured_from = Instant::now();
    let _ = shared.deadline.set(measured_from + options.duration);
    let poller = (!options.sleep_when_idle).then(|| {
        let stop = CancellationToken::new();
        let task = tokio::spawn(keep_polling(stop.clone()));
        (stop, task)
    });
    go.cancel();
    while tasks.join_next().await.is_some() {}
    if let Some((stop, task)) = poller {
        stop.cancel();
        let _ = task.await;
    }
    let measured = options.duration.min(measured_from.elapsed());
    progress.finish().await;
    let fd_limit = shared.fd_limit_hit.load(Relaxed).then(|| {
        let reached = FdLimitReached {
            limit: fd_soft_limit(),
            opened: shared.connected.load(Relaxed),
        };
        eprintln!("plexus bench: {reached}");
        reached
    });
    let published = shared.published.load(Relaxed);
    Ok(PublishReport {
        bench: "publish",
        url: options.path.url().to_owned(),
        via: options.path.name(),
        channel: options.channel.clone(),
        channels: options.channels,
        publishers: options.publishers,
        connected: shared.connected.load(Relaxed),
        failed: shared.failed.load(Relaxed),
        dropped: shared.dropped.load(Relaxed),
        size: options.size,
        duration_s: seconds(options.duration),
        published,
        errors: shared.errors.load(Relaxed),
        publishes_per_s: per_second(published, measured),
        latency_us: shared.latencies.summary(),
        failures: shared.failures.snapshot(),
        fd_limit,
        elapsed_s: seconds(start.elapsed()),
    })
}

/// Keeps the runtime's worker from sleeping until `stop`: a task that yields again each
/// time it runs, so the worker polls its sockets between tasks instead of blocking.
async fn keep_polling(stop: CancellationToken) {
    while !stop.is_cancelled() {
        tokio::task::yield_now().await;
    }
}

/// One publisher: connect, wait for `go`, publish one at a time until the deadline.
async fn publisher(
    index: u64,
    options: Arc<PublishOptions>,
    api_addr: Option<SocketAddr>,
    shared: Arc<Shared>,
    go: CancellationToken,
) {
    let channel = channel_for(&options.channel, options.channels, index);
    match &options.path {
        PublishPath::Native { endpoint } => {
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
            go.cancelled().await;
            let deadline = *shared.deadline.get().expect("set before go");
            match native_publishes(index, &mut ws, &channel, &options, &shared, deadline).await {
                Ok(()) => {
                    close(ws, Duration::from_secs(2)).await;
                }
                Err(reason) => {
                    shared.dropped.fetch_add(1, Relaxed);
                    shared.failures.add(format!("dropped: {reason}"));
                }
            }
        }
        PublishPath::Api {
            target,
            api_key,
            timeout,
        } => {
            let addr = api_addr.expect("resolved for the API");
            let mut api = ApiPublisher::new(target.clone(), addr, api_key.clone(), *timeout);
            shared.connected.fetch_add(1, Relaxed);
            go.cancelled().await;
            let deadline = *shared.deadline.get().expect("set before go");
            while Instant::now() < deadline {
                let sent = Instant::now();
                let stamp = stamp_message(index + 1, shared.now(), options.size);
                let outcome =
                    tokio::time::timeout_at(deadline.into(), api.publish(&channel, &stamp)).await;
                match outcome {
                    Err(_) => break, // the deadline passed: not counted
                    Ok(Ok(())) => {
                        shared.latencies.record(index, sent.elapsed());
                        shared.published.fetch_add(1, Relaxed);
                    }
                    Ok(Err(reason)) => {
                        shared.error(format!("publish: {reason}"));
                        // Do not spin on a server that refuses everything.
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
        }
    }
}

/// What a native message means to a publisher waiting for the reply to `id`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct NativeReplies {
    /// The reply to `id` came: `Ok`, or the error's code and message.
    pub answer: Option<Result<(), String>>,
    /// The server pinged: answer `{}`.
    pub ping: bool,
}

/// Reads the replies in one native message, looking for the answer to `id`.
pub fn native_replies(text: &str, id: u32) -> NativeReplies {
    let mut found = NativeReplies::default();
    for reply in parse_replies(text) {
        let reply = match reply {
            Ok(reply) => reply,
            Err(error) => {
                found
                    .answer
                    .get_or_insert(Err(format!("bad reply: {error}")));
                continue;
            }
        };
        if reply.is_server_ping() {
            found.ping = true;
        } else if reply.id == id {
            found.answer = Some(match reply.error {
                None => Ok(()),
                Some(error) => Err(format!("publish error {}: {}", error.code, error.message)),
            });
        }
    }
    found
}

/// Native publishes, one in flight, until `deadline`. `Err` when the connection broke.
async fn native_publishes(
    index: u64,
    ws: &mut Ws,
    channel: &str,
    options: &PublishOptions,
    shared: &Shared,
    deadline: Instant,
) -> Result<(), String> {
    let broken = |error| OpenError::from_ws(error).reason();
    let mut id: u32 = 1; // the connect was 1
    while Instant::now() < deadline {
        id = id.wrapping_add(1).max(2);
        let stamp = stamp_message(index + 1, shared.now(), options.size);
        let sent = Instant::now();
        ws.send(Message::text(native_publish(id, channel, stamp)))
            .await
            .map_err(broken)?;
        let answer = loop {
            let message = match tokio::time::timeout_at(deadline.into(), ws.next()).await {
                Err(_) => return Ok(()), // the deadline passed while waiting: not counted
                Ok(message) => message,
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
            let replies = native_replies(&text, id);
            if replies.ping {
                ws.send(Message::text("{}")).await.map_err(broken)?;
            }
            if let Some(answer) = replies.answer {
                break answer;
            }
        };
        match answer {
            Ok(()) => {
                shared.latencies.record(index, sent.elapsed());
                shared.published.fetch_add(1, Relaxed);
            }
            Err(reason) => shared.error(reason),
        }
    }
    Ok(())
}

impl fmt::Display for PublishReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "publish {} (via {}, channel {}{})",
            self.url,
            self.via,
            self.channel,
            if self.channels > 1 {
                format!(" × {}", self.channels)
            } else {
                String::new()
            }
        )?;
        writeln!(
            f,
            "  publishers {}/{} connected ({} failed, {} dropped), one publish in flight each, {} bytes",
            self.connected, self.publishers, self.failed, self.dropped, self.size
        )?;
        writeln!(
            f,
            "  acknowledged {} in {:.1}s: {:.1}/s ({} errors)",
            self.published, self.duration_s, self.publishes_per_s, self.errors
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publishers_spread_over_channels() {
        assert_eq!(channel_for("chat:bench", 1, 7), "chat:bench");
        assert_eq!(channel_for("chat:bench", 0, 7), "chat:bench");
        let spread: Vec<_> = (0..5).map(|i| channel_for("chat:p", 3, i)).collect();
        assert_eq!(
            spread,
            ["chat:p-0", "chat:p-1", "chat:p-2", "chat:p-0", "chat:p-1"]
        );
    }

    #[test]
    fn finds_the_reply_to_its_publish() {
        let check = |text: &str, id: u32, expected: NativeReplies| {
            assert_eq!(native_replies(text, id), expected, "{text}");
        };
        check(
            r#"{"id":5,"publish":{"offset":3,"epoch":"e"}}"#,
            5,
            NativeReplies {
                answer: Some(Ok(())),
                ping: false,
            },
        );
        // Another id, and a server ping in the same message.
        check(
            "{}\n{\"id\":4,\"publish\":{}}",
            5,
            NativeReplies {
                answer: None,
                ping: true,
            },
        );
        check(
            r#"{"id":6,"error":{"code":103,"message":"permission denied"}}"#,
            6,
            NativeReplies {
                answer: Some(Err("publish error 103: permission denied".into())),
                ping: false,
            },
        );
        assert!(matches!(
            native_replies("not json", 2).answer,
            Some(Err(reason)) if reason.starts_with("bad reply")
        ));
    }
}
