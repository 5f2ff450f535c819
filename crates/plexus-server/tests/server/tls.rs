//! wss and https on the main listener, with a certificate generated in the test.

use std::sync::Arc;

use plexus_server::config::TlsFiles;
use plexus_server::Config;
use rustls::pki_types::CertificateDer;
use tokio_tungstenite::Connector;

use crate::util::*;

/// A self-signed certificate for localhost written to a temporary directory.
fn certificate(dir: &std::path::Path) -> (TlsFiles, CertificateDer<'static>) {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    std::fs::write(&cert, certified.cert.pem()).unwrap();
    std::fs::write(&key, certified.signing_key.serialize_pem()).unwrap();
    (TlsFiles { cert, key }, certified.cert.der().clone())
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("plexus-test-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test]
async fn wss_echo_with_a_generated_certificate() {
    let dir = temp_dir("wss");
    let (files, der) = certificate(&dir);
    let server = start(Config {
        tls: Some(files),
        ..Config::for_tests()
    })
    .await;
    assert!(server.is_tls());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(der).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let url = format!("wss://localhost:{}/echo", server.http_addr().port());
    let (mut socket, _) = tokio_tungstenite::connect_async_tls_with_config(
        url,
        None,
        true,
        Some(Connector::Rustls(Arc::new(client))),
    )
    .await
    .expect("wss handshake with the generated certificate");
    send_text(&mut socket, "over TLS").await;
    assert_eq!(next_text(&mut socket).await, "over TLS");
    socket.close(None).await.unwrap();

    // A plain-text client on the TLS port gets nowhere, and the server keeps serving.
    let plain = tokio_tungstenite::connect_async(format!("ws://{}/echo", server.http_addr())).await;
    assert!(plain.is_err());
    std::fs::remove_dir_all(dir).ok();
}

#[tokio::test]
async fn missing_certificate_is_a_clear_bind_error() {
    let dir = temp_dir("missing");
    let files = TlsFiles {
        cert: dir.join("nope.pem"),
        key: dir.join("nope-key.pem"),
    };
    let error = plexus_server::Server::bind(Config {
        tls: Some(files),
        ..Config::for_tests()
    })
    .await
    .err()
    .expect("bind fails");
    assert!(error.to_string().contains("nope.pem"), "{error}");
}
