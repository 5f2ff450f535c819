//! The engine conformance suite (shared with every engine) on the NATS engine, against the
//! NATS (with JetStream) at `PLEXUS_TEST_NATS_URL` (default `nats://127.0.0.1:4222`). Every
//! engine gets a prefix of its own, so runs never see each other's streams; they are deleted
//! at the end.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use plexus_core::Engine;
use plexus_engine_nats::{NatsEngine, NatsOptions};

fn nats_url() -> String {
    std::env::var("PLEXUS_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

fn unique_prefix() -> String {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    format!(
        "plexus-test-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_engine_conforms() {
    let engines: Mutex<Vec<Arc<NatsEngine>>> = Mutex::new(Vec::new());
    let factory = |deliver| {
        let options = NatsOptions::new(nats_url(), unique_prefix());
        let engine = Arc::new(NatsEngine::new(options, deliver).unwrap());
        engines.lock().unwrap().push(engine.clone());
        engine as Arc<dyn Engine>
    };
    plexus_core::conformance::check_engine(&factory).await;
    let engines = std::mem::take(&mut *engines.lock().unwrap());
    assert!(!engines.is_empty());
    for engine in engines {
        assert!(engine.is_ready());
        engine.destroy().await.expect("streams and bucket deleted");
    }
}

#[tokio::test]
async fn bad_options_are_refused() {
    let deliver = Arc::new(plexus_core::conformance::Recorder::default());
    for (url, prefix) in [
        ("http://nope", "p"),
        ("nats://127.0.0.1:4222", ""),
        ("nats://127.0.0.1:4222", "a.b"),
        ("nats://127.0.0.1:4222", "a b"),
        ("nats://127.0.0.1:4222", "a*"),
    ] {
        let options = NatsOptions::new(url, prefix);
        assert!(
            NatsEngine::new(options, deliver.clone()).is_err(),
            "{url} {prefix}"
        );
    }
}
