//! A nats-server of the test's own (JetStream, its own store directory) on a free port,
//! plain or TLS.

// Each test binary uses part of this.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use plexus_core::conformance::TestPki;

/// A nats-server child, killed when dropped.
pub struct NatsServer {
    child: Child,
}

impl NatsServer {
    pub fn start(port: u16, store: &Path) -> NatsServer {
        NatsServer::spawn(port, store, &[])
    }

    /// TLS required on `port`, with a new certificate for `localhost` and 127.0.0.1 from a
    /// new CA, files in `dir`; returns the server and the CA's certificate (PEM).
    pub fn start_tls(port: u16, store: &Path, dir: &Path) -> (NatsServer, String) {
        let (server, pki) = NatsServer::tls(port, store, dir, false);
        (server, pki.ca)
    }

    /// The same, and a certificate from that CA required of clients (`--tlsverify`).
    pub fn start_mutual_tls(port: u16, store: &Path, dir: &Path) -> (NatsServer, TestPki) {
        NatsServer::tls(port, store, dir, true)
    }

    fn tls(port: u16, store: &Path, dir: &Path, verify_clients: bool) -> (NatsServer, TestPki) {
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

    fn spawn(port: u16, store: &Path, args: &[&str]) -> NatsServer {
        let child = Command::new("nats-server")
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(store)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server runs");
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "nats-server listens"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        NatsServer { child }
    }

    /// Stops the server (SIGSTOP), every thread of it, before returning.
    pub fn freeze(&self) {
        plexus_core::conformance::freeze_process(self.child.id());
    }

    /// Resumes a frozen server (SIGCONT).
    pub fn thaw(&self) {
        plexus_core::conformance::thaw_process(self.child.id());
    }

    pub fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
