//! Outages: a redis-server of the test's own on a free port is killed and started again; the
//! same engine fails fast while it is away and works again, deliveries included, once it is
//! back.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use plexus_core::conformance::Recorder;
use plexus_core::{ClientDescriptor, Engine, EngineError, HistoryRetention, Publication};
use plexus_engine_redis::{RedisEngine, RedisOptions};

use common::{free_port, RedisServer};

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fails_fast_while_redis_is_away_and_recovers_by_itself() {
    let port = free_port();
    let server = RedisServer::start(port);
    let recorder = Arc::new(Recorder::default());
    let engine = RedisEngine::new(
        RedisOptions::new(format!("redis://127.0.0.1:{port}"), "plexus-reconnect"),
        recorder.clone(),
    )
    .unwrap();
    engine.watch("chat:x", true).await.unwrap();
    let ann = Arc::new(ClientDescriptor {
        user: "ann".into(),
        client: "client-ann".into(),
        conn_info: None,
        chan_info: None,
    });
    engine.add_presence("chat:x", ann).await.unwrap();
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
    eventually("ready", Duration::from_secs(5), || engine.is_ready()).await;

    server.kill();
    eventually("not ready", Duration::from_secs(5), || !engine.is_ready()).await;
    let started = Instant::now();
    let error = engine
        .publish(publication("lost"), Some(RETENTION))
        .await
        .unwrap_err();
    assert!(
        matches!(
            error,
            EngineError::Unavailable {
                engine: "redis",
                ..
            }
        ),
        "{error:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(6), "failed fast");
    // Still away a while later (the engine backs off meanwhile): calls fail at once.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let started = Instant::now();
    assert!(engine.presence("chat:x").await.is_err());
    assert!(engine.watch("chat:y", true).await.is_err());
    assert!(engine.publish(publication("lost too"), None).await.is_err());
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "failed at once: {:?}",
        started.elapsed()
    );
    assert!(!engine.is_ready());

    // Back on the same port, empty (no persistence): the same engine reconnects by itself.
    let _server = RedisServer::start(port);
    eventually("ready again", Duration::from_secs(10), || engine.is_ready()).await;
    let again = engine
        .publish(publication("after"), Some(RETENTION))
        .await
        .expect("publishes again");
    assert_eq!(
        again.unwrap().offset,
        1,
        "a new stream: the old one was lost"
    );
    eventually("delivery again", Duration::from_secs(5), || {
        recorder.publications().last() == Some(&("after".to_owned(), 1))
    })
    .await;
    // Presence this node added is written again after reconnecting.
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
    // Commands (the control channel was subscribed again) reach this node.
    let command = plexus_core::NodeCommand::Subscribe {
        user: "ann".into(),
        channel: "chat:z".into(),
    };
    engine.command(command).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_redis_times_out_instead_of_hanging() {
    let port = free_port();
    let server = RedisServer::start(port);
    let recorder = Arc::new(Recorder::default());
    let engine = RedisEngine::new(
        RedisOptions::new(format!("redis://127.0.0.1:{port}"), "plexus-frozen"),
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
    eventually("not ready", Duration::from_secs(5), || !engine.is_ready()).await;
    server.thaw();
    eventually("ready again", Duration::from_secs(10), || engine.is_ready()).await;
    let position = engine
        .publish(publication("thawed"), Some(RETENTION))
        .await
        .unwrap()
        .unwrap();
    // The frozen publish may or may not have run once Redis resumed; nothing was reordered.
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
