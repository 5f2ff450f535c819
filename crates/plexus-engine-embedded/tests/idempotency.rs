//! Idempotency records of the embedded engine across a restart: read back from the log for
//! the rest of their time, and only that long.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use plexus_core::idempotency::Claim;
use plexus_core::{Deliver, Delivery, Engine, NodeCommand};
use plexus_engine_embedded::EmbeddedEngine;

struct Nowhere;

impl Deliver for Nowhere {
    fn deliver(&self, _: Delivery) {}
    fn interrupted(&self) {}
    fn command(&self, _: &NodeCommand) {}
}

fn open(dir: &std::path::Path) -> EmbeddedEngine {
    EmbeddedEngine::open(dir, Arc::new(Nowhere)).unwrap()
}

#[tokio::test]
async fn records_are_read_back_after_a_restart_until_they_end() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path());
    let pending = Duration::from_secs(30);
    for key in ["long", "short", "refused"] {
        assert_eq!(engine.claim("c:1", key, pending).await.unwrap(), Claim::Won);
    }
    engine
        .record(
            "c:1",
            "long",
            Bytes::from_static(b"7:e1"),
            Duration::from_secs(300),
        )
        .await
        .unwrap();
    engine
        .record(
            "c:1",
            "short",
            Bytes::from_static(b"8:e1"),
            Duration::from_secs(2),
        )
        .await
        .unwrap();
    engine.release("c:1", "refused").await.unwrap();
    drop(engine);

    let engine = open(dir.path());
    let held = |record: &'static [u8]| Claim::Held(Bytes::from_static(record));
    assert_eq!(
        engine.claim("c:1", "long", pending).await.unwrap(),
        held(b"7:e1")
    );
    assert_eq!(
        engine.claim("c:1", "short", pending).await.unwrap(),
        held(b"8:e1")
    );
    // Claims are not kept: what was refused (or in flight) is free after a restart.
    assert_eq!(
        engine.claim("c:1", "refused", pending).await.unwrap(),
        Claim::Won
    );
    // The same key in another channel is another record.
    assert_eq!(
        engine.claim("c:2", "long", pending).await.unwrap(),
        Claim::Won
    );
    drop(engine);

    // Past its end a record is not read back.
    tokio::time::sleep(Duration::from_millis(2_100)).await;
    let engine = open(dir.path());
    assert_eq!(
        engine.claim("c:1", "long", pending).await.unwrap(),
        held(b"7:e1")
    );
    assert_eq!(
        engine.claim("c:1", "short", pending).await.unwrap(),
        Claim::Won
    );
}
