//! Outages: a nats-server of the test's own (JetStream, its own store directory) on a free
//! port is killed and started again on the same port; the same engine fails fast while it is
//! away and works again, deliveries, presence and commands included, once it is back.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use plexus_core::conformance::Recorder;
use plexus_core::{
    ClientDescriptor, Deliver, Delivery, Engine, EngineError, HistoryQuery, HistoryRetention,
    NodeCommand, Publication,
};
use plexus_engine_nats::{NatsEngine, NatsOptions};

use common::{free_port, NatsServer};

/// Records deliveries and counts interruptions.
#[derive(Default)]
struct Hub {
    recorder: Recorder,
    interruptions: AtomicUsize,
}

impl Deliver for Hub {
    fn deliver(&self, delivery: Delivery) {
        self.recorder.deliver(delivery);
    }

    fn command(&self, command: &NodeCommand) {
        self.recorder.command(command);
    }

    fn interrupted(&self) {
        self.interruptions.fetch_add(1, Ordering::SeqCst);
    }
}

const RETENTION: HistoryRetention = HistoryRetention {
    size: 10,
    ttl: Duration::from_secs(60),
};

fn publication(text: &str) -> Publication {
    plexus_core::conformance::text_publication("chat:x", text)
}

async fn eventually(what: &str, limit: Duration, mut condition: impl FnMut() -> bool) {
    let started = Instant::now();
    while !condition() {
        assert!(started.elapsed() < limit, "{what} within {limit:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn ann() -> Arc<ClientDescriptor> {
    Arc::new(ClientDescriptor {
        user: "ann".into(),
        client: "client-ann".into(),
        conn_info: None,
        chan_info: None,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fails_fast_while_nats_is_away_and_recovers_by_itself() {
    let store = tempfile::tempdir().unwrap();
    let port = free_port();
    let server = NatsServer::start(port, store.path());
    let hub = Arc::new(Hub::default());
    let recorder = &hub.recorder;
    let engine = NatsEngine::new(
        NatsOptions::new(format!("nats://127.0.0.1:{port}"), "plexus-reconnect"),
        hub.clone(),
    )
    .unwrap();
    engine.watch("chat:x", true).await.unwrap();
    engine.add_presence("chat:x", ann()).await.unwrap();
    let first = engine
        .publish(publication("before"), Some(RETENTION))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.offset, 1);
    eventually("delivery", Duration::from_secs(5), || {
        recorder.publications() == [("before".to_owned(), 1)]
    })
    .await;
    assert!(engine.is_ready());

    server.kill();
    eventually("not ready", Duration::from_secs(5), || !engine.is_ready()).await;
    let started = Instant::now();
    let error = engine
        .publish(publication("lost"), Some(RETENTION))
        .await
        .unwrap_err();
    assert!(
        matches!(error, EngineError::Unavailable { engine: "nats", .. }),
        "{error:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(1), "failed at once");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let started = Instant::now();
    assert!(engine.presence("chat:x").await.is_err());
    assert!(engine
        .history("chat:x", HistoryQuery::default())
        .await
        .is_err());
    assert!(engine.watch("chat:y", true).await.is_err());
    assert!(engine.publish(publication("lost too"), None).await.is_err());
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "failed at once: {:?}",
        started.elapsed()
    );
    assert!(!engine.is_ready());

    // Back on the same port with the same store: the same engine reconnects by itself, and
    // the stream goes on where it was.
    let server = NatsServer::start(port, store.path());
    eventually("ready again", Duration::from_secs(10), || engine.is_ready()).await;
    assert_eq!(
        hub.interruptions.load(Ordering::SeqCst),
        1,
        "subscribers are told they may have missed publications"
    );
    let again = engine
        .publish(publication("after"), Some(RETENTION))
        .await
        .expect("publishes again")
        .unwrap();
    assert_eq!((again.offset, &again.epoch), (2, &first.epoch));
    eventually("delivery again", Duration::from_secs(5), || {
        recorder.publications().last() == Some(&("after".to_owned(), 2))
    })
    .await;
    // Presence this node added is written again after reconnecting (the presence stream
    // lives in memory: the restarted server had lost it).
    let started = Instant::now();
    loop {
        let presence = engine.presence("chat:x").await.unwrap();
        if presence.len() == 1 {
            assert_eq!(&*presence[0].user, "ann");
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "presence restored"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    engine
        .command(NodeCommand::Subscribe {
            user: "ann".into(),
            channel: "chat:z".into(),
        })
        .await
        .unwrap();

    // Restarted with an empty store: the history is lost, so the stream gets a new epoch.
    server.kill();
    let empty = tempfile::tempdir().unwrap();
    let _server = NatsServer::start(port, empty.path());
    let started = Instant::now();
    let fresh = loop {
        match engine.publish(publication("fresh"), Some(RETENTION)).await {
            Ok(position) => break position.unwrap(),
            Err(error) => {
                assert!(started.elapsed() < Duration::from_secs(10), "{error:?}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    assert_eq!(fresh.offset, 1);
    assert_ne!(fresh.epoch, first.epoch);
    eventually("delivered in the new epoch", Duration::from_secs(5), || {
        recorder.publications().last() == Some(&("fresh".to_owned(), 1))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_nats_times_out_instead_of_hanging() {
    let store = tempfile::tempdir().unwrap();
    let port = free_port();
    let server = NatsServer::start(port, store.path());
    let recorder = Arc::new(Recorder::default());
    let engine = NatsEngine::new(
        NatsOptions::new(format!("nats://127.0.0.1:{port}"), "plexus-frozen"),
        recorder.clone(),
    )
    .unwrap();
    engine.watch("chat:x", true).await.unwrap();
    engine
        .publish(publication("before"), Some(RETENTION))
        .await
        .unwrap();
    server.freeze();
    let started = Instant::now();
    let error = engine
        .publish(publication("frozen"), Some(RETENTION))
        .await
        .unwrap_err();
    assert!(
        matches!(error, EngineError::Unavailable { .. }),
        "{error:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "{:?}",
        started.elapsed()
    );
    eventually("not ready", Duration::from_secs(6), || !engine.is_ready()).await;
    server.thaw();
    eventually("ready again", Duration::from_secs(10), || engine.is_ready()).await;
    let position = engine
        .publish(publication("thawed"), Some(RETENTION))
        .await
        .unwrap()
        .unwrap();
    // The frozen publish may or may not have been stored once NATS resumed; nothing was
    // reordered.
    assert!(position.offset >= 2, "{position:?}");
    eventually("delivery again", Duration::from_secs(5), || {
        recorder
            .publications()
            .last()
            .map(|(text, _)| text.as_str())
            == Some("thawed")
    })
    .await;
    drop(server);
}
