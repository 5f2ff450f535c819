//! A nats-server of the test's own (JetStream, its own store directory) on a free port,
//! plain or TLS.

// Each test binary uses part of this.
#![allow(dead_code)]

use std::path::Path;
use std::process::Command;

use plexus_core::conformance::TestPki;
pub use plexus_core::conformance::{free_port, ServerProcess};

/// Starts servers; each is a [`ServerProcess`], killed when dropped.
pub struct NatsServer;

impl NatsServer {
    pub fn start(port: u16, store: &Path) -> ServerProcess {
        NatsServer::spawn(port, store, &[])
    }

    /// TLS required on `port`, with a new certificate for `localhost` and 127.0.0.1 from a
    /// new CA, files in `dir`; returns the server and the CA's certificate (PEM).
    pub fn start_tls(port: u16, store: &Path, dir: &Path) -> (ServerProcess, String) {
        let (server, pki) = NatsServer::tls(port, store, dir, false);
        (server, pki.ca)
    }

    /// The same, and a certificate from that CA required of clients (`--tlsverify`).
    pub fn start_mutual_tls(port: u16, store: &Path, dir: &Path) -> (ServerProcess, TestPki) {
        NatsServer::tls(port, store, dir, true)
    }

    fn tls(port: u16, store: &Path, dir: &Path, verify_clients: bool) -> (ServerProcess, TestPki) {
        let pki = TestPki::new();
        let (ca, cert, key) = pki.write_server_files(dir);
        let mut args = vec![
            "--tlscert",
            cert.to_str().unwrap(),
            "--tlskey",
            key.to_str().unwrap(),
            "--tlscacert",
            ca.to_str().unwrap(),
        ];
        args.push(if verify_clients {
            "--tlsverify"
        } else {
            "--tls"
        });
        (NatsServer::spawn(port, store, &args), pki)
    }

    fn spawn(port: u16, store: &Path, args: &[&str]) -> ServerProcess {
        let mut command = Command::new("nats-server");
        command
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(store)
            .args(args);
        ServerProcess::spawn(command, port)
    }
}
