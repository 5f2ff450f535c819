//! The engine conformance suite (shared with every engine) on the NATS engine, against the
//! NATS (with JetStream) at `PLEXUS_TEST_NATS_URL` (default `nats://127.0.0.1:4222`). Every
//! engine gets a prefix of its own, so runs never see each other's streams; they are deleted
//! at the end. And again over `tls://`, against a nats-server of the test's own that requires
//! TLS.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use plexus_core::conformance::{check_unavailable, until_ready, Recorder};
use plexus_core::Engine;
use plexus_engine_nats::{NatsEngine, NatsEngineError, NatsOptions};

use common::{free_port, NatsServer};

fn nats_url() -> String {
    std::env::var("PLEXUS_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

fn unique_prefix() -> String {
    plexus_core::conformance::unique_prefix("plexus-test")
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

/// Trusting the self-signed certificate of the server through `tls_ca`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_engine_conforms_over_tls() {
    let (dir, store) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let port = free_port();
    let (_server, certificate) = NatsServer::start_tls(port, store.path(), dir.path());
    let factory = |deliver| {
        let options = NatsOptions {
            tls_ca: Some(certificate.clone().into_bytes()),
            ..NatsOptions::new(format!("tls://localhost:{port}"), unique_prefix())
        };
        Arc::new(NatsEngine::new(options, deliver).unwrap()) as Arc<dyn Engine>
    };
    plexus_core::conformance::check_engine(&factory).await;
}

/// Without the certificate (the system's roots do not vouch for it) the engine never gets
/// ready, while one given the certificate does, and calls fail as unavailable; a CA without a
/// certificate in it is refused at start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_server_is_refused() {
    let (dir, store) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let port = free_port();
    let (_server, certificate) = NatsServer::start_tls(port, store.path(), dir.path());
    let options = |tls_ca: Option<&str>| NatsOptions {
        tls_ca: tls_ca.map(|pem| pem.as_bytes().to_vec()),
        timeout: Duration::from_secs(1),
        ..NatsOptions::new(format!("tls://localhost:{port}"), "plexus-tls-refused")
    };
    let recorder = Arc::new(Recorder::default());
    let trusted = NatsEngine::new(options(Some(&certificate)), recorder.clone()).unwrap();
    let refused = NatsEngine::new(options(None), recorder.clone()).unwrap();
    until_ready(&trusted).await;
    // Long enough for several attempts of the other.
    tokio::time::sleep(Duration::from_secs(1)).await;
    check_unavailable(&refused, "untrusted").await;
    trusted.destroy().await.expect("stream and bucket deleted");

    let not_a_certificate = NatsEngine::new(options(Some("not a certificate")), recorder);
    assert!(matches!(not_a_certificate, Err(NatsEngineError::TlsCa)));
}

/// A server that verifies client certificates: the engine with one conforms, one without
/// never gets ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls() {
    let (dir, store) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let port = free_port();
    let (_server, pki) = NatsServer::start_mutual_tls(port, store.path(), dir.path());
    let url = format!("tls://localhost:{port}");
    let with_certificate = |prefix: String| NatsOptions {
        tls_ca: Some(pki.ca.clone().into_bytes()),
        tls_client: Some((
            pki.client_cert.clone().into_bytes(),
            pki.client_key.clone().into_bytes(),
        )),
        ..NatsOptions::new(url.clone(), prefix)
    };
    let factory = |deliver| {
        Arc::new(NatsEngine::new(with_certificate(unique_prefix()), deliver).unwrap())
            as Arc<dyn Engine>
    };
    plexus_core::conformance::check_engine(&factory).await;
    let without = NatsOptions {
        tls_client: None,
        timeout: Duration::from_secs(1),
        ..with_certificate(unique_prefix())
    };
    let engine = NatsEngine::new(without, Arc::new(Recorder::default())).unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    check_unavailable(&engine, "no client certificate").await;
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
