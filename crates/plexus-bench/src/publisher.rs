//! The publishing side of a paced load (`fanout`, `overload`): a WebSocket client of the
//! subscribers' endpoint (a raw room member, or a native client sending `publish` commands
//! without waiting for the replies), or the server API.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use plexus_protocol::client::parse_replies;
use tokio_tungstenite::tungstenite::Message;

use crate::client::{native_publish, Endpoint, Failures, OpenError, Protocol, Ws};
use crate::http::ApiPublisher;
use crate::seq::{stamp_message, PROBE};
use crate::target::Target;
use crate::BenchError;

/// How the publisher publishes.
#[derive(Debug, Clone)]
pub enum PublishVia {
    /// A client of the same endpoint and protocol: a raw room member sends text; a native client
    /// sends `publish` commands.
    Endpoint,
    /// `POST /api/publish` at `target` with `api_key`.
    Api { target: Target, api_key: String },
}

pub(crate) enum PublishError {
    /// This message was not published; the publisher can go on.
    Rejected(String),
    /// The publisher cannot go on.
    Broken(String),
}

impl fmt::Display for PublishError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PublishError::Rejected(reason) | PublishError::Broken(reason) => f.write_str(reason),
        }
    }
}

/// The publishing side: a WebSocket client of the endpoint, or the API.
pub(crate) enum Publisher {
    Ws {
        url: String,
        protocol: Protocol,
        channel: String,
        sink: SplitSink<Ws, Message>,
        stream: Option<SplitStream<Ws>>,
        reader: Option<tokio::task::JoinHandle<()>>,
        /// The native server pinged: answer before the next publish.
        pong_due: Arc<AtomicBool>,
        next_id: u32,
    },
    Api {
        url: String,
        channel: String,
        api: ApiPublisher,
    },
}

impl Publisher {
    /// Opens the publisher for `channel`: a client of `endpoint` (never subscribed), or the API.
    pub(crate) async fn open(
        endpoint: &Endpoint,
        channel: &str,
        via: &PublishVia,
    ) -> Result<Publisher, BenchError> {
        match via {
            PublishVia::Endpoint => {
                let mut endpoint = endpoint.clone();
                if let Protocol::Native {
                    channel,
                    tags_filter,
                    format,
                    delta,
                    ..
                } = &mut endpoint.protocol
                {
                    *channel = None; // a publisher need not subscribe
                    *tags_filter = None;
                    *delta = false;
                    *format = plexus_protocol::client::Format::Json; // publishes JSON stamps
                }
                let ws =
                    endpoint
                        .open(u64::MAX - 1)
                        .await
                        .map_err(|error| BenchError::Connect {
                            target: endpoint.target.url.clone(),
                            reason: format!("the publisher: {}", error.reason()),
                        })?;
                let (sink, stream) = ws.split();
                Ok(Publisher::Ws {
                    url: endpoint.target.url.clone(),
                    protocol: endpoint.protocol.clone(),
                    channel: channel.to_owned(),
                    sink,
                    stream: Some(stream),
                    reader: None,
                    pong_due: Arc::new(AtomicBool::new(false)),
                    next_id: 1,
                })
            }
            PublishVia::Api { target, api_key } => {
                let addr = target.resolve().await?;
                let mut api =
                    ApiPublisher::new(target.clone(), addr, api_key.clone(), endpoint.timeout);
                // A probe first: the API answers, and takes the key and the channel.
                let probe = stamp_message(PROBE, 0, 0);
                api.publish(channel, &probe)
                    .await
                    .map_err(|reason| BenchError::Connect {
                        target: target.url.clone(),
                        reason,
                    })?;
                Ok(Publisher::Api {
                    url: target.url.clone(),
                    channel: channel.to_owned(),
                    api,
                })
            }
        }
    }

    pub(crate) fn describe(&self) -> String {
        match self {
            Publisher::Ws { url, .. } | Publisher::Api { url, .. } => url.clone(),
        }
    }

    /// Whether publish errors come back later (native replies, read by the reader) rather than
    /// from [`Publisher::publish`] itself.
    pub(crate) fn errors_come_late(&self) -> bool {
        matches!(self, Publisher::Ws { .. })
    }

    /// Reads what the server sends the publisher: a raw room member gets its own messages
    /// back (and must read them, or be cut as slow); a native client gets `publish` replies,
    /// whose errors go to `on_error`.
    pub(crate) fn start_reader(&mut self, on_error: impl Fn(String) + Send + 'static) {
        let Publisher::Ws {
            protocol,
            stream,
            reader,
            pong_due,
            ..
        } = self
        else {
            return;
        };
        let Some(mut stream) = stream.take() else {
            return;
        };
        let native = matches!(protocol, Protocol::Native { .. });
        let pong_due = pong_due.clone();
        *reader = Some(tokio::spawn(async move {
            while let Some(Ok(message)) = stream.next().await {
                if !native {
                    continue;
                }
                let Message::Text(text) = message else {
                    continue;
                };
                for reply in parse_replies(&text).into_iter().flatten() {
                    if reply.is_server_ping() {
                        pong_due.store(true, Relaxed);
                    } else if let Some(error) = reply.error {
                        on_error(format!("publish error {}: {}", error.code, error.message));
                    }
                }
            }
        }));
    }

    /// Publishes message number `seq` of a paced load (stamped with `t`, padded to `size`),
    /// counting a refusal in `errors` and `failures`. Returns whether it was published, or
    /// `Err` when the publisher cannot go on (the reason is in `failures`).
    pub(crate) async fn publish_numbered(
        &mut self,
        seq: u64,
        t: u64,
        size: usize,
        errors: &AtomicU64,
        failures: &Failures,
    ) -> Result<bool, ()> {
        match self.publish(stamp_message(seq, t, size)).await {
            Ok(()) => Ok(true),
            Err(PublishError::Rejected(reason)) => {
                // Not published: the caller sends the same number again next time.
                errors.fetch_add(1, Relaxed);
                failures.add(format!("publish: {reason}"));
                Ok(false)
            }
            Err(PublishError::Broken(reason)) => {
                failures.add(format!("publisher: {reason}"));
                Err(())
            }
        }
    }

    pub(crate) async fn publish(&mut self, stamp: String) -> Result<(), PublishError> {
        match self {
            Publisher::Ws {
                protocol,
                channel,
                sink,
                pong_due,
                next_id,
                ..
            } => {
                let text = match protocol {
                    Protocol::Raw => stamp,
                    Protocol::Native { .. } => {
                        let id = *next_id;
                        *next_id = next_id.wrapping_add(1).max(1);
                        let mut text = native_publish(id, channel, stamp);
                        if pong_due.swap(false, Relaxed) {
                            text.insert_str(0, "{}\n");
                        }
                        text
                    }
                };
                sink.send(Message::text(text))
                    .await
                    .map_err(|error| PublishError::Broken(OpenError::from_ws(error).reason()))
            }
            Publisher::Api { channel, api, .. } => api
                .publish(channel, &stamp)
                .await
                .map_err(PublishError::Rejected),
        }
    }

    pub(crate) async fn close(self) {
        if let Publisher::Ws {
            mut sink, reader, ..
        } = self
        {
            let _ = tokio::time::timeout(Duration::from_secs(2), sink.close()).await;
            if let Some(reader) = reader {
                let _ = tokio::time::timeout(Duration::from_secs(2), reader).await;
            }
        }
    }
}
