//! The engine conformance suite (shared with every engine) on the Redis engine, against the
//! Redis at `PLEXUS_TEST_REDIS_URL` (default `redis://127.0.0.1:6379`), and again over
//! `rediss://` against a redis-server of the test's own that speaks only TLS. Every engine
//! gets a key prefix of its own, so runs never see each other's keys.

mod common;

use std::sync::Arc;
use std::time::Duration;

use plexus_core::conformance::{check_unavailable, until_ready, Recorder};
use plexus_core::Engine;
use plexus_engine_redis::{RedisEngine, RedisOptions};

use common::{free_port, RedisServer};

fn redis_url() -> String {
    std::env::var("PLEXUS_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

fn unique_prefix() -> String {
    plexus_core::conformance::unique_prefix("plexus-test")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_engine_conforms() {
    let factory = |deliver| {
        let mut options = RedisOptions::new(redis_url(), unique_prefix());
        options.history_meta_ttl = Duration::from_secs(120);
        Arc::new(RedisEngine::new(options, deliver).unwrap()) as Arc<dyn Engine>
    };
    plexus_core::conformance::check_engine(&factory).await;
}

/// Trusting the self-signed certificate of the server through `tls_ca`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_engine_conforms_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let (_server, certificate) = RedisServer::start_tls(port, dir.path());
    let factory = |deliver| {
        let options = RedisOptions {
            tls_ca: Some(certificate.clone().into_bytes()),
            ..RedisOptions::new(format!("rediss://localhost:{port}"), unique_prefix())
        };
        Arc::new(RedisEngine::new(options, deliver).unwrap()) as Arc<dyn Engine>
    };
    plexus_core::conformance::check_engine(&factory).await;
}

/// Without the certificate (the system's and Mozilla's roots do not vouch for it), and over
/// plain `redis://` to the TLS port, the engine never gets ready, while one given the
/// certificate does, and calls fail as unavailable: no fallback to an unverified connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_server_or_plain_text_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let (_server, certificate) = RedisServer::start_tls(port, dir.path());
    let engine = |url: String, tls_ca: Option<&String>| {
        let options = RedisOptions {
            tls_ca: tls_ca.map(|pem| pem.clone().into_bytes()),
            timeout: Duration::from_secs(1),
            ..RedisOptions::new(url, "plexus-tls-refused")
        };
        RedisEngine::new(options, Arc::new(Recorder::default())).unwrap()
    };
    let trusted = engine(format!("rediss://localhost:{port}"), Some(&certificate));
    let refused = [
        engine(format!("rediss://localhost:{port}"), None),
        engine(format!("redis://127.0.0.1:{port}"), None),
    ];
    until_ready(&trusted).await;
    // Long enough for several attempts of the others.
    tokio::time::sleep(Duration::from_secs(1)).await;
    for engine in refused {
        check_unavailable(&engine, &engine.options().url).await;
    }
}

/// A server that requires client certificates: the engine with one conforms, one without
/// never gets ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let (_server, pki) = RedisServer::start_mutual_tls(port, dir.path());
    let url = format!("rediss://localhost:{port}");
    let with_certificate = |prefix: String| RedisOptions {
        tls_ca: Some(pki.ca.clone().into_bytes()),
        tls_client: Some((
            pki.client_cert.clone().into_bytes(),
            pki.client_key.clone().into_bytes(),
        )),
        ..RedisOptions::new(url.clone(), prefix)
    };
    let factory = |deliver| {
        Arc::new(RedisEngine::new(with_certificate(unique_prefix()), deliver).unwrap())
            as Arc<dyn Engine>
    };
    plexus_core::conformance::check_engine(&factory).await;
    let without = RedisOptions {
        tls_client: None,
        timeout: Duration::from_secs(1),
        ..with_certificate(unique_prefix())
    };
    let engine = RedisEngine::new(without, Arc::new(Recorder::default())).unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    check_unavailable(&engine, "no client certificate").await;
}

#[tokio::test]
async fn bad_options_are_refused() {
    let deliver = Arc::new(plexus_core::conformance::Recorder::default());
    assert!(RedisEngine::new(RedisOptions::new("http://nope", "p"), deliver.clone()).is_err());
    assert!(RedisEngine::new(RedisOptions::new(redis_url(), ""), deliver).is_err());
}
