//! `plexus bench`: a client-side load generator for Plexus (or any server speaking the same
//! WebSocket endpoints). It knows nothing of the server's code: it opens sockets, speaks the
//! raw WebSocket endpoints or the native protocol (with `plexus-protocol`'s JSON), and measures.
//!
//! Six loads, each bounded in count and in time (a hard limit stops any run), each aimed at the
//! loopback range only (127.0.0.0/8, `::1`, `localhost`) unless the caller allows another host:
//!
//! | load | what it does |
//! |---|---|
//! | [`conns`] | opens N idle connections at a ramp rate, holds them, reports connect latency, failures by reason, and the server's RSS per connection |
//! | [`fanout`] | N subscribers on one channel, one publisher at R messages/s; every subscriber checks order and loss and records latency |
//! | [`echo`] | C connections doing round trips on `/echo`, `inflight` at a time each |
//! | [`churn`] | connect/close cycles at R per second |
//! | [`publish`] | N publishers, one acknowledged publish in flight each, through the native protocol or the HTTP API: publishes/s and latency |
//! | [`overload`] | slow subscribers (reading less than is published) and fast ones, while probes time new connections and HTTP requests: who was cut with 3008, server RSS |
//!
//! Clients are tokio tasks speaking tokio-tungstenite, except the fan-out subscribers: tasks open
//! them (with a hand-written upgrade) and one thread reads them all with `epoll` and an in-place
//! frame parser, so that reading a delivery costs the generator less than writing it costs the
//! server and the latency measured is the server's ([`fanout`]'s `reader`).
//!
//! Client sockets are bound to 127.0.0.1 … 127.0.0.N in turn ([`Sources`]) so that tens of
//! thousands of connections do not run out of one address's ephemeral ports. Running out of file
//! descriptors (EMFILE) stops the opening of more, and the report says where ([`FdLimitReached`]).
//!
//! # Measured messages
//!
//! Fan-out and echo send text messages `{"seq":1,"t":123,"pad":"xxx"}`: `seq` counts from 1
//! (0 marks warm-up probes, never counted), `t` is the send time in nanoseconds since the run's
//! start instant (publisher and receivers share the process, so the clocks agree), and `pad` fills
//! the message to `--size` bytes. Native publishers publish that JSON as the publication's `data`;
//! the API publisher posts it as `data` to `/api/publish`.
//!
//! Before the measured phase, the fan-out publisher sends probes until every subscriber has
//! received one: a subscriber that has seen a probe is subscribed, and since a channel delivers in
//! one order, it will see every measured message. A gap is then loss, not a late subscription.
//!
//! # JSON output
//!
//! With `--json`, the command prints one object on stdout: the report of its load, serialized
//! with serde. Every report has `bench` (the load's name), `url`, `elapsed_s` (the whole run,
//! seconds), `failures` (an object: reason → count, e.g. `{"connection refused": 3,
//! "HTTP 503": 2, "dropped: closed 3008 slow": 1}`), and `fd_limit` (`null`, or
//! `{"limit": 1024, "opened": 1012}` when this process ran out of descriptors). Latencies are
//! objects `{count, min_us, mean_us, p50_us, p90_us, p99_us, p999_us, max_us}` in microseconds
//! ([`LatencySummary`]). Then, per load:
//!
//! - `conns` ([`ConnsReport`]): `protocol` (`raw`/`native`), `requested`, `attempted`,
//!   `connected`, `failed`, `dropped` (connected, then closed before the end of the hold),
//!   `held` (open at the end of the hold), `hold_s`, `sources`, `connect_latency_us`,
//!   `server_rss_kib` (`null`, or `{before, after, per_connection_kib}` with `--server-pid`).
//! - `fanout` ([`FanoutReport`]): `protocol`, `publisher` (`raw`/`native`/`api`), `channel`,
//!   `subscribers` (requested), `connected`, `ready` (received a probe), `failed`, `dropped`,
//!   `rate` (`"50/s"`), `size`, `duration_s`, `planned` (messages the rate and duration call for),
//!   `sent` (published successfully), `publish_errors`, `deliveries` (measured messages received,
//!   all subscribers), `expected_deliveries` (`ready × sent`), `deliveries_per_s`, `lost`
//!   (sum over subscribers of sent − received), `out_of_order` (arrivals lower than one already
//!   seen), `latency_us`.
//! - `echo` ([`EchoReport`]): `connections`, `connected`, `failed`, `dropped`, `inflight`, `size`,
//!   `duration_s`, `round_trips` (replies received within the duration), `round_trips_per_s`,
//!   `unreadable` (replies that were not a sent message), `latency_us`.
//! - `churn` ([`ChurnReport`]): `protocol`, `rate`, `duration_s`, `attempted`, `succeeded`
//!   (connected and closed cleanly), `failed`, `connect_latency_us`.
//! - `publish` ([`PublishReport`]): `via` (`native`/`api`), `channel`, `channels`, `publishers`,
//!   `connected`, `failed`, `dropped`, `size`, `duration_s`, `published` (acknowledged within
//!   the duration), `errors` (answered with an error), `publishes_per_s`, `latency_us` (publish
//!   to acknowledgement).
//! - `overload` ([`OverloadReport`]): `protocol`, `channel`, `rate`, `read_rate` (what each slow
//!   subscriber reads), `size`, `duration_s`, `planned`, `sent`, `publish_errors`, `slow` and
//!   `fast` (each `{requested, connected, ready, failed, closed_slow (closed with 3008),
//!   closed_other, open_at_end, deliveries, lost, out_of_order, latency_us}`), `probes` (each
//!   `{url, kind: websocket/get/api, attempts, ok, failures, latency_us}`), `server_rss_kib`
//!   (`null`, or `{before, max, end, samples}` with `--server-pid`).
//!
//! The exit status is 0 when a run completes, whatever it measured: read the counts. It is 2 for
//! bad usage (a bad URL, a non-loopback target, a number out of bounds) and 1 when the target
//! cannot be reached at all (connection refused, a refused handshake) or the hard time limit
//! stopped the run ([`BenchError::exit_code`]).

mod churn;
pub mod client;
mod conns;
mod echo;
mod fanout;
pub mod http;
pub mod latency;
mod overload;
pub mod progress;
mod publish;
mod publisher;
pub mod rate;
pub mod seq;
pub mod system;
pub mod target;
mod wsframe;

use std::future::Future;
use std::time::Duration;

pub use churn::{churn, ChurnOptions, ChurnReport};
pub use client::{Endpoint, Protocol};
pub use conns::{conns, ConnsOptions, ConnsReport, RssReport};
pub use echo::{echo, EchoOptions, EchoReport};
pub use fanout::{fanout, FanoutOptions, FanoutReport};
pub use latency::LatencySummary;
pub use overload::{overload, OverloadOptions, OverloadReport, Probe, SLOW_RECV_BUFFER};
/// A tags filter, as `Protocol::Native` subscribes with, and the format it speaks.
pub use plexus_protocol::client::{FilterNode, Format};
pub use progress::ProgressMode;
pub use publish::{publish, PublishOptions, PublishPath, PublishReport};
pub use publisher::PublishVia;
pub use rate::Rate;
pub use target::{Sources, Target};

/// Why a run could not start or finish.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// Bad usage: a URL, a target that is not loopback, a number out of bounds.
    #[error("{0}")]
    Usage(String),
    /// The target could not be reached at all.
    #[error("cannot connect to {target}: {reason}")]
    Connect { target: String, reason: String },
    /// The hard time limit stopped the run.
    #[error("the run hit its hard time limit of {} and was stopped (raise it with --time-limit)", humantime::format_duration(*.0))]
    TimeLimit(Duration),
}

impl BenchError {
    /// 2 for usage errors, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            BenchError::Usage(_) => 2,
            BenchError::Connect { .. } | BenchError::TimeLimit(_) => 1,
        }
    }
}

/// A load's report: a human summary (`Display`) and the JSON object of the crate docs.
pub trait Report: std::fmt::Display {
    fn to_json(&self) -> String;
}

macro_rules! report {
    ($($name:ty),*) => {$(
        impl Report for $name {
            fn to_json(&self) -> String {
                serde_json::to_string(self).expect("reports serialize")
            }
        }
    )*};
}

report!(
    ConnsReport,
    FanoutReport,
    EchoReport,
    ChurnReport,
    PublishReport,
    OverloadReport
);

/// The process ran out of file descriptors: no more connections were opened after `opened`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct FdLimitReached {
    /// `RLIMIT_NOFILE` (soft) of this process.
    pub limit: Option<u64>,
    /// Connections open when it was reached.
    pub opened: u64,
}

impl std::fmt::Display for FdLimitReached {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let limit = self
            .limit
            .map_or_else(|| "?".to_owned(), |limit| limit.to_string());
        write!(
            f,
            "stopped opening connections: this process reached its open-files limit \
             (RLIMIT_NOFILE {limit}) with {} connections open; raise it (ulimit -n) to open more",
            self.opened
        )
    }
}

/// The most connections or subscribers one run may open.
pub const MAX_CONNECTIONS: u64 = 1_000_000;
/// The longest measured duration of one run.
pub const MAX_DURATION: Duration = Duration::from_secs(3600);
/// The largest message.
pub const MAX_SIZE: usize = 16 * 1024 * 1024;

/// Checks that `value` is between 1 and `max`.
pub fn check_count(name: &str, value: u64, max: u64) -> Result<(), BenchError> {
    if value == 0 || value > max {
        return Err(BenchError::Usage(format!(
            "{name} must be 1 to {max}, not {value}"
        )));
    }
    Ok(())
}

/// Checks that a duration is more than zero and at most [`MAX_DURATION`].
pub fn check_duration(name: &str, value: Duration) -> Result<(), BenchError> {
    if value.is_zero() || value > MAX_DURATION {
        return Err(BenchError::Usage(format!(
            "{name} must be more than 0 and at most {}, not {}",
            humantime::format_duration(MAX_DURATION),
            humantime::format_duration(value)
        )));
    }
    Ok(())
}

/// Runs `run` within `limit`, or fails with [`BenchError::TimeLimit`] (dropping `run` stops every
/// connection task it owns).
pub async fn within<T>(
    limit: Duration,
    run: impl Future<Output = Result<T, BenchError>>,
) -> Result<T, BenchError> {
    tokio::time::timeout(limit, run)
        .await
        .unwrap_or(Err(BenchError::TimeLimit(limit)))
}

/// Builds the endpoint for `url`: parses it, applies the loopback rule, resolves the address.
pub async fn endpoint(
    url: &str,
    protocol: Protocol,
    sources: Sources,
    allow_remote: bool,
    timeout: Duration,
) -> Result<Endpoint, BenchError> {
    let target = Target::websocket(url)?;
    target.check_allowed(allow_remote)?;
    let addr = target.resolve().await?;
    if !allow_remote && !addr.ip().is_loopback() {
        return Err(BenchError::Usage(format!(
            "refusing to load {addr}: not a loopback address; pass --allow-remote to load a host you own"
        )));
    }
    Ok(Endpoint {
        target,
        addr,
        protocol,
        sources: Some(sources),
        timeout,
        recv_buffer: None,
    })
}

/// Seconds, rounded to the millisecond, for reports.
pub(crate) fn seconds(duration: Duration) -> f64 {
    (duration.as_secs_f64() * 1000.0).round() / 1000.0
}

/// A per-second rate, rounded to one decimal.
pub(crate) fn per_second(count: u64, span: Duration) -> f64 {
    if span.is_zero() {
        return 0.0;
    }
    (count as f64 / span.as_secs_f64() * 10.0).round() / 10.0
}

/// The failures table of a human summary, one reason a line.
pub(crate) fn write_failures(
    f: &mut std::fmt::Formatter<'_>,
    failures: &std::collections::BTreeMap<String, u64>,
) -> std::fmt::Result {
    for (reason, count) in failures {
        writeln!(f, "  {count:>8}  {reason}")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds() {
        check_count("--count", 1, 10).unwrap();
        check_count("--count", 10, 10).unwrap();
        assert!(
            matches!(check_count("--count", 0, 10), Err(BenchError::Usage(m)) if m.contains("--count must be 1 to 10"))
        );
        assert!(check_count("--count", 11, 10).is_err());
        check_duration("--duration", Duration::from_secs(1)).unwrap();
        assert!(check_duration("--duration", Duration::ZERO).is_err());
        assert!(check_duration("--duration", MAX_DURATION + Duration::from_secs(1)).is_err());
    }

    #[test]
    fn exit_codes() {
        assert_eq!(BenchError::Usage("x".into()).exit_code(), 2);
        let refused = BenchError::Connect {
            target: "ws://127.0.0.1:9/echo".into(),
            reason: "connection refused".into(),
        };
        assert_eq!(refused.exit_code(), 1);
        assert_eq!(
            refused.to_string(),
            "cannot connect to ws://127.0.0.1:9/echo: connection refused"
        );
        assert!(BenchError::TimeLimit(Duration::from_secs(70))
            .to_string()
            .contains("1m 10s"));
    }

    #[test]
    fn fd_limit_message_names_the_limit_and_the_count() {
        let message = FdLimitReached {
            limit: Some(1024),
            opened: 1012,
        }
        .to_string();
        assert!(message.contains("RLIMIT_NOFILE 1024"), "{message}");
        assert!(message.contains("1012 connections"), "{message}");
    }

    #[test]
    fn rounding() {
        assert_eq!(seconds(Duration::from_micros(1_234_567)), 1.235);
        assert_eq!(per_second(10, Duration::from_secs(4)), 2.5);
        assert_eq!(per_second(10, Duration::ZERO), 0.0);
    }

    #[tokio::test]
    async fn refuses_remote_targets() {
        let refused = endpoint(
            "ws://10.1.2.3:8000/echo",
            Protocol::Raw,
            Sources::new(1).unwrap(),
            false,
            Duration::from_secs(1),
        )
        .await
        .unwrap_err();
        assert_eq!(refused.exit_code(), 2);
        assert!(refused.to_string().contains("--allow-remote"), "{refused}");
        let local = endpoint(
            "ws://localhost:8000/echo",
            Protocol::Raw,
            Sources::new(8).unwrap(),
            false,
            Duration::from_secs(1),
        )
        .await
        .unwrap();
        assert_eq!(local.addr, "127.0.0.1:8000".parse().unwrap());
    }

    #[tokio::test]
    async fn refused_connection_is_a_clear_error() {
        // A port that was just free: nothing listens there.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let endpoint = endpoint(
            &format!("ws://127.0.0.1:{port}/echo"),
            Protocol::Raw,
            Sources::new(2).unwrap(),
            false,
            Duration::from_secs(2),
        )
        .await
        .unwrap();
        let error = client::preflight(&endpoint).await.unwrap_err();
        assert_eq!(error.exit_code(), 1);
        assert!(error.to_string().contains("connection refused"), "{error}");
    }
}
