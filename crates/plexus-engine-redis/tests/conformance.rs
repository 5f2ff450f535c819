//! The engine conformance suite (shared with every engine) on the Redis engine, against the
//! Redis at `PLEXUS_TEST_REDIS_URL` (default `redis://127.0.0.1:6379`). Every engine gets a
//! key prefix of its own, so runs never see each other's keys.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use plexus_engine_redis::{RedisEngine, RedisOptions};

fn redis_url() -> String {
    std::env::var("PLEXUS_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
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
async fn redis_engine_conforms() {
    let factory = |deliver| {
        let mut options = RedisOptions::new(redis_url(), unique_prefix());
        options.history_meta_ttl = Duration::from_secs(120);
        Arc::new(RedisEngine::new(options, deliver).unwrap()) as Arc<dyn plexus_core::Engine>
    };
    plexus_core::conformance::check_engine(&factory).await;
}

#[tokio::test]
async fn bad_options_are_refused() {
    let deliver = Arc::new(plexus_core::conformance::Recorder::default());
    assert!(RedisEngine::new(RedisOptions::new("http://nope", "p"), deliver.clone()).is_err());
    assert!(RedisEngine::new(RedisOptions::new(redis_url(), ""), deliver).is_err());
}
