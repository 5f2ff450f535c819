//! `plexus bench`: flags for the load generator in `plexus-bench`, and its report on stdout.
//!
//! ```text
//! plexus bench conns  ws://127.0.0.1:8000/chat/bench --count 10000 --server-pid PID
//! plexus bench fanout ws://127.0.0.1:8000/chat/bench --subscribers 1000 --rate 50/s --duration 10s
//! plexus bench echo   ws://127.0.0.1:8000/echo --connections 10 --duration 10s
//! plexus bench churn  ws://127.0.0.1:8000/echo --rate 200/s --duration 10s
//! plexus bench publish ws://127.0.0.1:8000/connection/websocket --token T --publishers 64
//! plexus bench publish http://127.0.0.1:8000/api/publish --api-key K --publishers 64
//! plexus bench overload ws://127.0.0.1:8000/chat/slow --subscribers 100 --rate 300/s \
//!     --probe-ws ws://127.0.0.1:8000/echo --probe-get http://127.0.0.1:8000/metrics
//! ```
//!
//! A progress line goes to stderr; the summary (or with `--json` one JSON object, documented in
//! the `plexus-bench` crate) to stdout. Exit status: 0 when the run completed, 2 for bad usage
//! (including a target outside the loopback range without `--allow-remote`), 1 when the target
//! cannot be reached or the hard time limit stopped the run.

use std::time::Duration;

use anyhow::anyhow;
use plexus_bench::{
    BenchError, ChurnOptions, ConnsOptions, EchoOptions, Endpoint, FanoutOptions, FilterNode,
    Format, OverloadOptions, Probe, ProgressMode, Protocol, PublishOptions, PublishPath,
    PublishVia, Rate, Report, Sources, Target,
};

use crate::Failure;

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    load: Load,
}

#[derive(Debug, clap::Subcommand)]
enum Load {
    /// Open N idle connections, hold them, report connect latency and server memory
    Conns(ConnsArgs),
    /// N subscribers on one channel, one publisher at a rate: latency, loss, order
    Fanout(FanoutArgs),
    /// Round trips on /echo
    Echo(EchoArgs),
    /// Connect/close cycles at a rate
    Churn(ChurnArgs),
    /// Acknowledged publishes as fast as they go, N publishers with one in flight each
    Publish(PublishArgs),
    /// Subscribers slower than the publisher, while probes check the server still answers
    Overload(OverloadArgs),
}

fn duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|error| format!("{text:?}: {error}"))
}

fn rate(text: &str) -> Result<Rate, String> {
    text.parse()
}

#[derive(Debug, clap::Args)]
struct Common {
    /// Print one JSON object on stdout instead of a summary
    #[arg(long)]
    json: bool,
    /// No progress line on stderr
    #[arg(short, long)]
    quiet: bool,
    /// Allow a target outside 127.0.0.0/8, ::1 and localhost (only a host you own)
    #[arg(long)]
    allow_remote: bool,
    /// Bind client sockets to 127.0.0.1 … 127.0.0.N in turn (IPv4 loopback targets)
    #[arg(long, value_name = "N", default_value_t = 8)]
    sources: u32,
    /// Limit for each TCP connect and each handshake
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = duration)]
    connect_timeout: Duration,
    /// Stop the whole run after this long [default: the run's own length plus a minute]
    #[arg(long, value_name = "DURATION", value_parser = duration)]
    time_limit: Option<Duration>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum ProtocolName {
    /// Raw WebSocket: /echo, /chat/{room}
    Raw,
    /// The native protocol at /connection/websocket
    Native,
}

#[derive(Debug, clap::Args)]
struct ProtocolArgs {
    /// How clients talk to URL
    #[arg(long, value_enum, default_value = "raw")]
    protocol: ProtocolName,
    /// Native protocol: the connection token (`plexus token --user ID`)
    #[arg(long)]
    token: Option<String>,
    /// Native protocol: the channel to subscribe to [fanout: also where to publish; raw
    /// /chat/{room} URLs use chat:{room}]
    #[arg(long)]
    channel: Option<String>,
    /// Native protocol: subscribe with this tags filter (JSON, e.g.
    /// '{"key":"x","cmp":"nex"}'; the namespace must allow tags filters)
    #[arg(long, value_name = "JSON")]
    tags_filter: Option<String>,
    /// Native protocol: subscribers speak Protobuf (subprotocol centrifuge-protobuf, binary
    /// messages) [fanout only; its publisher stays on JSON]
    #[arg(long)]
    protobuf: bool,
    /// Native protocol: subscribers ask for delta compression (delta: "fossil"; the namespace
    /// must allow it) and apply each delta [fanout only]
    #[arg(long)]
    delta: bool,
}

#[derive(Debug, clap::Args)]
struct ConnsArgs {
    /// ws:// URL, e.g. ws://127.0.0.1:8000/chat/bench
    url: String,
    /// Connections to open
    #[arg(long)]
    count: u64,
    /// How long to hold them once open
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = duration)]
    duration: Duration,
    /// How fast to open them
    #[arg(long, default_value = "2000/s", value_parser = rate)]
    ramp: Rate,
    /// The server's pid: report its RSS before and after, per connection
    #[arg(long, value_name = "PID")]
    server_pid: Option<u32>,
    #[command(flatten)]
    protocol: ProtocolArgs,
    #[command(flatten)]
    common: Common,
}

#[derive(Debug, clap::Args)]
struct FanoutArgs {
    /// ws:// URL, e.g. ws://127.0.0.1:8000/chat/bench
    url: String,
    /// Subscribers on the channel
    #[arg(long)]
    subscribers: u64,
    /// Messages per second from the publisher
    #[arg(long, value_parser = rate)]
    rate: Rate,
    /// How long to publish
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = duration)]
    duration: Duration,
    /// Bytes per message
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// How fast subscribers connect
    #[arg(long, default_value = "2000/s", value_parser = rate)]
    ramp: Rate,
    /// Publish through the server API instead, e.g. http://127.0.0.1:8000/api/publish
    #[arg(long, value_name = "URL", requires = "api_key")]
    publish_api: Option<String>,
    /// The API key for --publish-api
    #[arg(long, value_name = "KEY")]
    api_key: Option<String>,
    #[command(flatten)]
    protocol: ProtocolArgs,
    #[command(flatten)]
    common: Common,
}

#[derive(Debug, clap::Args)]
struct EchoArgs {
    /// ws:// URL of an echo endpoint, e.g. ws://127.0.0.1:8000/echo
    url: String,
    /// Connections doing round trips
    #[arg(long, default_value_t = 10)]
    connections: u64,
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = duration)]
    duration: Duration,
    /// Bytes per message
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Messages in flight on each connection
    #[arg(long, default_value_t = 1)]
    inflight: u64,
    /// How fast connections open
    #[arg(long, default_value = "2000/s", value_parser = rate)]
    ramp: Rate,
    #[command(flatten)]
    common: Common,
}

#[derive(Debug, clap::Args)]
struct ChurnArgs {
    /// ws:// URL, e.g. ws://127.0.0.1:8000/echo
    url: String,
    /// Connect/close cycles per second
    #[arg(long, value_parser = rate)]
    rate: Rate,
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = duration)]
    duration: Duration,
    #[command(flatten)]
    protocol: ProtocolArgs,
    #[command(flatten)]
    common: Common,
}

#[derive(Debug, clap::Args)]
struct PublishArgs {
    /// ws:// URL of the native endpoint (ws://127.0.0.1:8000/connection/websocket, needs
    /// --token) or http:// URL of the API's publish (http://127.0.0.1:8000/api/publish, needs
    /// --api-key)
    url: String,
    /// Concurrent publishers, each waiting for the acknowledgement of one publish at a time
    #[arg(long, default_value_t = 64)]
    publishers: u64,
    /// The channel, or the stem of CHANNEL-0 … CHANNEL-(N-1) with --channels N
    #[arg(long, default_value = "chat:bench")]
    channel: String,
    /// Channels the publishers are spread over
    #[arg(long, default_value_t = 1)]
    channels: u64,
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = duration)]
    duration: Duration,
    /// Bytes per message
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Native: the connection token (`plexus token --user ID`)
    #[arg(long)]
    token: Option<String>,
    /// API: the server's API key
    #[arg(long, value_name = "KEY")]
    api_key: Option<String>,
    /// Let the generator sleep while every publisher waits for its acknowledgement. By
    /// default it keeps polling instead: on loopback the server's write of an
    /// acknowledgement pays for waking a sleeping generator, which a remote client would
    /// not cost it
    #[arg(long)]
    sleep_when_idle: bool,
    #[command(flatten)]
    common: Common,
}

#[derive(Debug, clap::Args)]
struct OverloadArgs {
    /// ws:// URL of the subscribers, e.g. ws://127.0.0.1:8000/chat/slow
    url: String,
    /// Slow subscribers: each reads at most --read-rate messages a second
    #[arg(long)]
    subscribers: u64,
    /// Subscribers that read everything as it comes
    #[arg(long, default_value_t = 0)]
    fast_subscribers: u64,
    /// Messages per second from the publisher
    #[arg(long, value_parser = rate)]
    rate: Rate,
    /// Messages per second each slow subscriber reads [default: a third of --rate]
    #[arg(long, value_parser = rate)]
    read_rate: Option<Rate>,
    /// How long to publish
    #[arg(long, value_name = "DURATION", default_value = "20s", value_parser = duration)]
    duration: Duration,
    /// Bytes per message (big enough that a slow subscriber's backlog outgrows the kernel's
    /// socket buffers, up to 4 MiB each on Linux, within seconds)
    #[arg(long, default_value_t = 4096)]
    size: usize,
    /// How fast subscribers connect
    #[arg(long, default_value = "2000/s", value_parser = rate)]
    ramp: Rate,
    /// Probe: a new WebSocket connection and one round trip (e.g. ws://…/echo); repeatable
    #[arg(long, value_name = "URL")]
    probe_ws: Vec<String>,
    /// Probe: GET, expecting 200 (e.g. http://…/metrics); repeatable
    #[arg(long, value_name = "URL")]
    probe_get: Vec<String>,
    /// Probe: POST {} to an API method with --api-key (e.g. http://…/api/info); repeatable
    #[arg(long, value_name = "URL", requires = "api_key")]
    probe_api: Vec<String>,
    /// How often the probes run (each probe once)
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = duration)]
    probe_every: Duration,
    /// A probe that takes longer fails
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = duration)]
    probe_timeout: Duration,
    /// After publishing, how long slow subscribers read at full speed to reach a close frame
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = duration)]
    drain: Duration,
    /// The server's pid: sample its RSS with the probes
    #[arg(long, value_name = "PID")]
    server_pid: Option<u32>,
    /// Publish through the server API instead, e.g. http://127.0.0.1:8000/api/publish
    #[arg(long, value_name = "URL", requires = "api_key")]
    publish_api: Option<String>,
    /// The API key for --publish-api and --probe-api
    #[arg(long, value_name = "KEY")]
    api_key: Option<String>,
    #[command(flatten)]
    protocol: ProtocolArgs,
    #[command(flatten)]
    common: Common,
}

/// A third of `rate`: what slow subscribers take by default.
fn a_third_of(rate: Rate) -> Rate {
    Rate {
        count: rate.count,
        per: rate.per * 3,
    }
}

fn failure(error: BenchError) -> Failure {
    Failure::new(error.exit_code(), anyhow!(error))
}

fn usage(message: String) -> Failure {
    failure(BenchError::Usage(message))
}

impl Common {
    fn progress(&self) -> ProgressMode {
        if self.quiet {
            ProgressMode::Off
        } else {
            ProgressMode::detect()
        }
    }

    async fn endpoint(&self, url: &str, protocol: Protocol) -> Result<Endpoint, Failure> {
        let sources = Sources::new(self.sources).map_err(failure)?;
        plexus_bench::endpoint(
            url,
            protocol,
            sources,
            self.allow_remote,
            self.connect_timeout,
        )
        .await
        .map_err(failure)
    }

    /// An http:// target, with the loopback rule applied.
    fn http_target(&self, url: &str) -> Result<Target, Failure> {
        let target = Target::http(url).map_err(failure)?;
        target.check_allowed(self.allow_remote).map_err(failure)?;
        Ok(target)
    }

    /// Through the API with `--publish-api URL --api-key KEY`, else through the endpoint.
    fn publish_via(
        &self,
        publish_api: Option<&str>,
        api_key: Option<&str>,
    ) -> Result<PublishVia, Failure> {
        Ok(match (publish_api, api_key) {
            (Some(url), Some(api_key)) => PublishVia::Api {
                target: self.http_target(url)?,
                api_key: api_key.to_owned(),
            },
            _ => PublishVia::Endpoint,
        })
    }

    fn report(&self, report: &impl Report) -> Result<(), Failure> {
        if self.json {
            println!("{}", report.to_json());
        } else {
            println!("{report}");
        }
        Ok(())
    }
}

impl ProtocolArgs {
    /// The channel publications go to: `--channel`, else `chat:{room}` of a raw /chat/{room} URL.
    fn channel_of(&self, url: &str, protocol: &Protocol) -> Result<String, Failure> {
        match (&self.channel, protocol) {
            (Some(channel), _) => Ok(channel.clone()),
            (None, Protocol::Native { .. }) => {
                Err(usage("--protocol native needs --channel".into()))
            }
            (None, Protocol::Raw) => Target::websocket(url)
                .map_err(failure)?
                .chat_channel()
                .ok_or_else(|| {
                    usage(format!(
                        "{url}: a raw fan-out needs a /chat/{{room}} URL (or --channel)"
                    ))
                }),
        }
    }

    /// The clients' protocol; `subscribe` says whether native clients subscribe to `--channel`.
    fn protocol(&self, subscribe: bool) -> Result<Protocol, Failure> {
        match self.protocol {
            ProtocolName::Raw => {
                if self.token.is_some() {
                    return Err(usage("--token is for --protocol native".into()));
                }
                if self.delta || self.protobuf || self.tags_filter.is_some() {
                    return Err(usage(
                        "--delta, --protobuf and --tags-filter are for --protocol native".into(),
                    ));
                }
                Ok(Protocol::Raw)
            }
            ProtocolName::Native if self.delta && self.tags_filter.is_some() => Err(usage(
                "--delta and --tags-filter do not go together (the server refuses a filter \
                 with deltas)"
                    .into(),
            )),
            ProtocolName::Native => Ok(Protocol::Native {
                token: self.token.clone().unwrap_or_default(),
                channel: if subscribe {
                    self.channel.clone()
                } else {
                    None
                },
                tags_filter: match &self.tags_filter {
                    None => None,
                    Some(json) => {
                        let filter: FilterNode = serde_json::from_str(json)
                            .map_err(|error| usage(format!("--tags-filter: {error}")))?;
                        filter
                            .validate()
                            .map_err(|error| usage(format!("--tags-filter: {error}")))?;
                        Some(Box::new(filter))
                    }
                },
                format: if self.protobuf {
                    Format::Protobuf
                } else {
                    Format::Json
                },
                delta: self.delta,
            }),
        }
    }
}

pub async fn run(args: BenchArgs) -> Result<(), Failure> {
    // Many connections need many descriptors: raise the soft limit as the server does.
    let _ = plexus_bench::system::raise_fd_limit();
    match args.load {
        Load::Conns(args) => {
            let endpoint = args
                .common
                .endpoint(&args.url, args.protocol.protocol(true)?)
                .await?;
            let options = ConnsOptions {
                endpoint,
                count: args.count,
                duration: args.duration,
                ramp: args.ramp,
                server_pid: args.server_pid,
                progress: args.common.progress(),
            };
            let limit = args
                .common
                .time_limit
                .unwrap_or_else(|| options.default_time_limit());
            let report = plexus_bench::within(limit, plexus_bench::conns(options))
                .await
                .map_err(failure)?;
            args.common.report(&report)
        }
        Load::Fanout(args) => {
            let protocol = args.protocol.protocol(true)?;
            let channel = args.protocol.channel_of(&args.url, &protocol)?;
            let endpoint = args.common.endpoint(&args.url, protocol).await?;
            let publish = args
                .common
                .publish_via(args.publish_api.as_deref(), args.api_key.as_deref())?;
            let options = FanoutOptions {
                endpoint,
                channel,
                subscribers: args.subscribers,
                rate: args.rate,
                duration: args.duration,
                size: args.size,
                publish,
                ramp: args.ramp,
                progress: args.common.progress(),
            };
            let limit = args
                .common
                .time_limit
                .unwrap_or_else(|| options.default_time_limit());
            let report = plexus_bench::within(limit, plexus_bench::fanout(options))
                .await
                .map_err(failure)?;
            args.common.report(&report)
        }
        Load::Echo(args) => {
            let endpoint = args.common.endpoint(&args.url, Protocol::Raw).await?;
            let options = EchoOptions {
                endpoint,
                connections: args.connections,
                duration: args.duration,
                size: args.size,
                inflight: args.inflight,
                ramp: args.ramp,
                progress: args.common.progress(),
            };
            let limit = args
                .common
                .time_limit
                .unwrap_or_else(|| options.default_time_limit());
            let report = plexus_bench::within(limit, plexus_bench::echo(options))
                .await
                .map_err(failure)?;
            args.common.report(&report)
        }
        Load::Churn(args) => {
            let endpoint = args
                .common
                .endpoint(&args.url, args.protocol.protocol(true)?)
                .await?;
            let options = ChurnOptions {
                endpoint,
                rate: args.rate,
                duration: args.duration,
                progress: args.common.progress(),
            };
            let limit = args
                .common
                .time_limit
                .unwrap_or_else(|| options.default_time_limit());
            let report = plexus_bench::within(limit, plexus_bench::churn(options))
                .await
                .map_err(failure)?;
            args.common.report(&report)
        }
        Load::Publish(args) => run_publish(args).await,
        Load::Overload(args) => run_overload(args).await,
    }
}

async fn run_publish(args: PublishArgs) -> Result<(), Failure> {
    let path = if args.url.to_ascii_lowercase().starts_with("http://") {
        let api_key = args
            .api_key
            .clone()
            .ok_or_else(|| usage("publishing through the API needs --api-key".into()))?;
        PublishPath::Api {
            target: args.common.http_target(&args.url)?,
            api_key,
            timeout: args.common.connect_timeout,
        }
    } else {
        let token = args.token.clone().ok_or_else(|| {
            usage(
                "publishing through the native protocol needs --token (plexus token --user ID)"
                    .into(),
            )
        })?;
        let protocol = Protocol::Native {
            token,
            channel: None,
            tags_filter: None,
            format: Format::Json,
            delta: false,
        };
        PublishPath::Native {
            endpoint: args.common.endpoint(&args.url, protocol).await?,
        }
    };
    let options = PublishOptions {
        path,
        channel: args.channel,
        channels: args.channels,
        publishers: args.publishers,
        duration: args.duration,
        size: args.size,
        progress: args.common.progress(),
        sleep_when_idle: args.sleep_when_idle,
    };
    let limit = args
        .common
        .time_limit
        .unwrap_or_else(|| options.default_time_limit());
    let report = plexus_bench::within(limit, plexus_bench::publish(options))
        .await
        .map_err(failure)?;
    args.common.report(&report)
}

async fn run_overload(args: OverloadArgs) -> Result<(), Failure> {
    let protocol = args.protocol.protocol(true)?;
    let channel = args.protocol.channel_of(&args.url, &protocol)?;
    let endpoint = args.common.endpoint(&args.url, protocol).await?;
    let publish = args
        .common
        .publish_via(args.publish_api.as_deref(), args.api_key.as_deref())?;
    let mut probes = Vec::new();
    for url in &args.probe_ws {
        probes.push(Probe::WebSocket(
            args.common.endpoint(url, Protocol::Raw).await?,
        ));
    }
    for url in &args.probe_get {
        probes.push(Probe::Get(args.common.http_target(url)?));
    }
    for url in &args.probe_api {
        probes.push(Probe::Api {
            target: args.common.http_target(url)?,
            api_key: args.api_key.clone().unwrap_or_default(),
        });
    }
    let options = OverloadOptions {
        endpoint,
        channel,
        publish,
        slow_subscribers: args.subscribers,
        fast_subscribers: args.fast_subscribers,
        rate: args.rate,
        read_rate: args.read_rate.unwrap_or_else(|| a_third_of(args.rate)),
        duration: args.duration,
        size: args.size,
        ramp: args.ramp,
        probes,
        probe_every: args.probe_every,
        probe_timeout: args.probe_timeout,
        drain: args.drain,
        server_pid: args.server_pid,
        progress: args.common.progress(),
    };
    let limit = args
        .common
        .time_limit
        .unwrap_or_else(|| options.default_time_limit());
    let report = plexus_bench::within(limit, plexus_bench::overload(options))
        .await
        .map_err(failure)?;
    args.common.report(&report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slow_readers_take_a_third_by_default() {
        let third = a_third_of(Rate::per_second(300));
        assert_eq!(third.events_per_second(), 100.0);
        assert_eq!(third.to_string(), "300/3s");
    }
}
