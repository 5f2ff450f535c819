//! The raw room handler behind `/chat/{room}`: each message is published unchanged to the
//! room's channel; each publication comes back as one frame with the data unchanged.

use std::sync::Arc;

use bytes::Bytes;
use plexus_core::{
    BoxFuture, ClientInfo, Control, Delivery, DirectWriter, Encoding, EngineError, MessageKind,
    Outbox, Publication, StreamPosition, Subscriber,
};
use plexus_protocol::ws::{close, deflate, encode_frame, OpCode};

use super::connection::Out;
use crate::Shared;

/// Messages shorter than this go uncompressed even when deflate was negotiated.
pub(crate) const COMPRESS_MIN: usize = 128;

pub(crate) fn opcode(kind: MessageKind) -> OpCode {
    match kind {
        MessageKind::Text => OpCode::Text,
        MessageKind::Binary => OpCode::Binary,
    }
}

/// A data frame for a message, compressed when that pays.
pub(crate) fn data_frame(kind: MessageKind, data: &[u8], deflate: bool) -> Bytes {
    if deflate && data.len() >= COMPRESS_MIN {
        encode_frame(opcode(kind), &deflate::compress(data), true)
    } else {
        encode_frame(opcode(kind), data, false)
    }
}

/// A publication as a raw frame, encoded once for every raw subscriber.
pub(crate) fn publication_frame(publication: &Publication, deflate: bool) -> &Bytes {
    let encoding = if deflate && publication.data.len() >= COMPRESS_MIN {
        Encoding::WebSocketRawDeflated
    } else {
        Encoding::WebSocketRaw
    };
    publication.encoded(encoding, |p| data_frame(p.kind, &p.data, deflate))
}

/// Why a raw client may not join a room whose namespace needs tokens or the backend.
pub(crate) const NATIVE_ONLY: &str = "this room needs the native protocol";

pub(crate) struct RawRoom {
    channel: Arc<str>,
    info: Arc<ClientInfo>,
    outbox: Arc<Outbox>,
    /// The acknowledgement of this connection's latest publish (the engine acknowledges in
    /// order, so it covers all earlier ones). Awaited before answering a close, so a client that
    /// sends and closes at once still gets its own messages back.
    last_publish: Option<BoxFuture<Result<Option<StreamPosition>, EngineError>>>,
}

impl RawRoom {
    /// Registers an anonymous connection and subscribes it to `channel`; `writer`, if given,
    /// writes for its outbox while parked.
    pub(crate) async fn join(
        shared: &Shared,
        channel: &str,
        writer: Option<Arc<dyn DirectWriter>>,
    ) -> Result<RawRoom, (u16, String)> {
        if shared
            .node
            .options(channel)
            .is_ok_and(|options| !options.open_to_raw_clients())
        {
            return Err((close::POLICY, NATIVE_ONLY.to_owned()));
        }
        let id = shared.node.hub().next_connection_id();
        let info = Arc::new(ClientInfo::new(
            id,
            crate::new_client_id(),
            "".into(),
            None,
            &format!("ws-{id}"),
        ));
        let outbox = Arc::new(Outbox::new(shared.config.outbox_limit));
        if let Some(writer) = writer {
            outbox.set_writer(writer);
        }
        let subscriber = Subscriber {
            info: info.clone(),
            outbox: outbox.clone(),
            join_leave: false,
        };
        shared.node.hub().register(subscriber.clone());
        match shared.node.subscribe(channel, subscriber, None, None).await {
            Ok(subscription) => Ok(RawRoom {
                channel: subscription.channel,
                info,
                outbox,
                last_publish: None,
            }),
            Err(error) => {
                shared.node.hub().unregister(id);
                Err((close::POLICY, error.to_string()))
            }
        }
    }

    pub(crate) fn outbox(&self) -> &Arc<Outbox> {
        &self.outbox
    }

    pub(crate) fn on_message(&mut self, shared: &Shared, kind: MessageKind, data: Bytes) {
        let publication = Publication::new(
            self.channel.clone(),
            kind,
            data,
            Some(self.info.descriptor(None)),
        );
        match shared.node.publish(publication) {
            // Ordered now; a raw client gets no acknowledgement, so only the latest is kept.
            Ok(acknowledgement) => self.last_publish = Some(acknowledgement),
            Err(error) => tracing::warn!(%error, "raw room publish refused"),
        }
        shared.metrics.publications.inc();
    }

    /// Waits (at most `timeout`) until this connection's publishes are stored and delivered.
    pub(crate) async fn settle(&mut self, timeout: std::time::Duration) {
        if let Some(acknowledgement) = self.last_publish.take() {
            let _ = tokio::time::timeout(timeout, acknowledgement).await;
        }
    }

    pub(crate) fn on_deliveries(
        &mut self,
        batch: Vec<Delivery>,
        deflate: bool,
        out: &mut Vec<Out>,
    ) {
        for delivery in batch {
            match delivery {
                Delivery::Publication(publication) | Delivery::Chained { publication, .. } => {
                    out.push(Out::Frame(publication_frame(&publication, deflate).clone()))
                }
                Delivery::Join(_) | Delivery::Leave(_) => {} // raw clients get data only
                Delivery::Control(Control::Disconnect { code, reason }) => {
                    out.push(Out::Close(code, reason.to_string()))
                }
                Delivery::Control(Control::Unsubscribe { .. }) => out.push(Out::Close(
                    close::NORMAL,
                    "unsubscribed by the server".into(),
                )),
                // One room per raw connection, and raw clients keep no stream position nor
                // expiry; heartbeats are the connection's (see `connection`).
                Delivery::Control(
                    Control::Subscribe { .. }
                    | Control::Resync { .. }
                    | Control::Refresh { .. }
                    | Control::Reply(_)
                    | Control::Heartbeat
                    | Control::HeartbeatTimeout
                    | Control::Shutdown,
                ) => {}
                // (The connection takes a `Rest` before its handler sees the batch.)
                Delivery::Control(Control::Frame(frame) | Control::Rest(frame)) => {
                    out.push(Out::Frame(frame))
                }
            }
        }
    }

    pub(crate) async fn leave(&mut self, shared: &Shared) {
        self.outbox.close();
        shared.node.unsubscribe(&self.channel, &self.info).await;
        shared.node.hub().unregister(self.info.id);
    }
}
